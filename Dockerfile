# CPU image: docker build -t gptserve . && docker run -p 8000:8000 gptserve  (args after the image go to `gptserve`)
# torch comes from PyPI by default (its Linux wheel carries CUDA, so the same image runs on a
# GPU host with --gpus all); pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index URL> for a
# much smaller CPU-only image.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=

# TORCH_EXTENSIONS_DIR: a fixed place for the compiled CPU kernel, so build time and run time
# agree whatever $HOME is (it must stay writable at run time: torch takes a lock file there).
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TORCH_EXTENSIONS_DIR=/opt/torch_extensions
WORKDIR /src

# g++ builds the CPU kernels (gptserve/model/csrc/); without it they silently fall back
# to plain PyTorch. Not version-pinned: it follows the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# The README's install steps: the pinned torch first, then the package.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX:-https://pypi.org/simple}"
COPY pyproject.toml README.md ./
COPY gptserve ./gptserve
RUN pip install .

# Compile the kernels now (25-50 s), not on the first request; fail the build if they can't be had.
# They are built with -march=native for the CPU that builds the image, and nothing re-checks the
# CPU at run time: on a CPU lacking the build host's instructions (e.g. AVX-512) the server dies
# with an illegal instruction rather than falling back. Rebuild the image on (a CPU like) the
# one that runs it, or run it with -e GPTSERVE_NO_KERNELS=1. (A step of its own, so the install
# above stays the README's and a failed kernel build reruns alone.) It runs in /app, which holds
# no copy of the package: the build is cached for the sources at one path, and from /src
# `python -c` would compile /src's copy, leaving the installed one, which the server imports,
# to be compiled again at its first start.
WORKDIR /app
RUN python -c "from gptserve.model import cpu_kernels as k; import sys; sys.exit(0 if k.paged_decode() and k.row_argmax() else 'CPU kernels unavailable')"

EXPOSE 8000
ENTRYPOINT ["gptserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
