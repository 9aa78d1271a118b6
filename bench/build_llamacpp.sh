#!/usr/bin/env bash
# Builds the llama.cpp peer for bench/compare.py from llama-cpp-python's source
# distribution (PyPI vendors llama.cpp in it): llama.cpp's own `llama-server` (CPU,
# parallel slots), its `convert_hf_to_gguf.py` plus the `gguf` package, and, as a
# fallback peer, llama-cpp-python's server.
#
#   bench/build_llamacpp.sh [DIR]        # DIR defaults to .cache/llamacpp at the repository root
#
# A relative DIR is taken from the current folder; run it from the repository root, e.g.
#   JOBS=2 bench/build_llamacpp.sh .cache/llamacpp
#
# Env: JOBS (make -j, default 2), NATIVE (GGML_NATIVE, default ON),
#      SKIP_PY=1 to skip `pip install llama-cpp-python[server]`.
#
# NATIVE=OFF makes the portable build bench/compare.py falls back on where a native build
# does not start: the vector instruction sets this CPU has (AVX2, FMA, F16C, AVX-512 and its
# VNNI and BF16 extensions) switched on one by one, AMX left off:
#   NATIVE=OFF SKIP_PY=1 bench/build_llamacpp.sh .cache/llamacpp-portable
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-"$ROOT/.cache/llamacpp"}
JOBS=${JOBS:-2}
NATIVE=${NATIVE:-ON}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cd "$DIR"

# 1. The sdist, unpacked; its vendor/llama.cpp is the source of everything below.
if ! ls -d llama_cpp_python-*/vendor/llama.cpp >/dev/null 2>&1; then
    python -m pip download --no-deps --no-binary :all: llama-cpp-python -d .
    tar xzf llama_cpp_python-*.tar.gz
fi
SDIST=$(ls -d llama_cpp_python-*/ | sort -V | tail -1)
SDIST=${SDIST%/}
SRC="$DIR/$SDIST/vendor/llama.cpp"
ln -sfn "$SRC" src
echo "llama.cpp sources: $SRC"

# 2. llama-server: CPU only, no web UI download, no HTTPS, no tests/examples.
ISA=()
if [ "$NATIVE" = OFF ]; then
    FLAGS=$(grep -m1 '^flags' /proc/cpuinfo || true)
    has() { [[ " $FLAGS " == *" $1 "* ]] && echo ON || echo OFF; }
    ISA=(-DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
         -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
         -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AMX_TILE=OFF
         -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    echo "portable build: ${ISA[*]}"
fi
cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" \
    -DGGML_NATIVE="$NATIVE" -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build build --target llama-server -j "$JOBS"
ls -la build/bin/llama-server

# 3. The converter's Python side: gguf (from PyPI) and what convert_hf_to_gguf imports.
python -m pip install gguf sentencepiece

# 4. Fallback peer: llama-cpp-python's own server (compiles llama.cpp again).
if [ "${SKIP_PY:-0}" != 1 ]; then
    CMAKE_ARGS="-DGGML_NATIVE=$NATIVE" MAKEFLAGS="-j$JOBS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        python -m pip install "$DIR/$SDIST.tar.gz[server]" \
        2>&1 | tail -5
fi
echo "done: $DIR/build/bin/llama-server, $SRC/convert_hf_to_gguf.py"
