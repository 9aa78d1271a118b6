"""The engine needs none of the server's dependencies: a GPU machine with torch, triton and
transformers (plus the engine's own few packages) runs bench/gpu_check.py's engine steps
without FastAPI, uvicorn or pydantic installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gptserve.engine

SERVER_ONLY = ("fastapi", "uvicorn", "pydantic", "pydantic_core", "starlette", "sse_starlette", "jinja2",
               "prometheus_client", "httpx", "jsonschema_rs", "platformdirs")
ENGINE_MODULES = sorted(p.stem for p in Path(gptserve.engine.__file__).parent.glob("*.py") if p.stem != "__init__")

CHECK = f"""
import sys
for name in {SERVER_ONLY!r}:
    sys.modules[name] = None  # "import fastapi" now raises ImportError, as where it isn't installed
import importlib
for module in {ENGINE_MODULES!r}:
    importlib.import_module("gptserve.engine." + module)
from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams
engine = LLMEngine(sys.argv[1], EngineConfig(device="cpu", kv_cache_memory=2**20))
[[tokens]] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
assert len(tokens) == 4
assert not [m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r} and sys.modules[m] is not None]
print("ok")
"""


def test_every_engine_module_imports_and_generates_with_the_server_dependencies_blocked(tiny_checkpoint):
    done = subprocess.run([sys.executable, "-c", CHECK, str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
