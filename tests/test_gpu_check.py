"""bench/gpu_check.py, the one script a person with a GPU runs, works before any GPU sees it:
its CPU smoke mode runs every step on tiny shapes, and it says what to do where the
server's packages are missing."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_run_passes_every_step_and_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    steps = report["steps"]
    assert set(steps) == {"parity:tiny:float32", "engine:tiny:float32", "lora:tiny:float32", "served:tiny:float32"}
    assert steps["lora:tiny:float32"]["ok"]
    assert steps["parity:tiny:float32"]["ok"] and steps["parity:tiny:float32"]["greedy_equal_steps"] == [16, 16]
    engine = steps["engine:tiny:float32"]
    assert engine["graphs_vs_eager"]["ok"] and engine["offline"]["requests"] == 16
    assert engine["itl"]["floor_ms"] > 0 and engine["offline"]["ratio"] > 0
    served = steps["served:tiny:float32"]
    assert served["ok"] and set(served["by_concurrency"]) == {"1", "4"}
    table = out.with_suffix(".md").read_text()
    for step in ("(a) parity", "(b) graphs = eager", "(c) batch-1 ITL", "(d) offline", "(e) served, concurrency 4",
                 "(f) LoRA"):
        assert step in table


def test_without_the_servers_packages_the_served_step_says_how_to_bring_them(monkeypatch):
    script = load_script()
    args = script.parse_args(["--device", "cpu", "--smoke"])
    assert script.serve_skip_reason(args) is None  # this machine has them
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    reason = script.serve_skip_reason(args)
    assert "fastapi, uvicorn" in reason and "--wheels DIR" in reason
    assert script.missing(script.SERVER_PACKAGES) == ["fastapi", "uvicorn"]


def test_help_says_how_to_bring_missing_packages():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--wheels" in done.stdout and "pip download -d wheels" in done.stdout and "--smoke" in done.stdout
