"""The package's layering: the HTTP layer loads no torch, and no module imports itself
back through another."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gptserve

PACKAGE = Path(gptserve.__file__).parent
HEAVY = ("torch", "triton", "llguidance.torch")
# what the server may see of the engine: its client interface, outputs and sampling parameters
ENGINE_FACE = {"gptserve.engine", "gptserve.engine.client", "gptserve.engine.outputs",
               "gptserve.engine.sampling_params"}


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_server_app_loads_no_torch():
    loaded = _loaded_after_import("gptserve.server.app")
    assert not [m for m in HEAVY if m in loaded]


def test_the_engine_loads_no_compiler_machinery():
    """torch.compile's machinery (torch._dynamo, triton) costs ~250 MB of resident memory and
    seconds of start-up; a CPU engine, built and serving, uses none of it."""
    code = ("import sys\n"
            "from gptserve.config import EngineConfig\n"
            "from gptserve.engine.llm_engine import LLMEngine\n"
            "from gptserve.engine.sampling_params import SamplingParams\n"
            "engine = LLMEngine(None, EngineConfig(device='cpu', kv_cache_memory=2**24))\n"
            "engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))\n"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "gptserve.engine.grammar" in loaded
    assert not {"torch._dynamo", "torch._inductor", "triton", "llguidance.torch"} & loaded


def test_the_ray_ingress_loads_no_torch():
    pytest.importorskip("ray.serve")
    loaded = _loaded_after_import("gptserve.deploy.application")
    assert not [m for m in HEAVY if m in loaded]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that this file imports, at any level (type-only ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def test_the_server_imports_only_the_engines_public_face():
    graph = _graph()
    reached = {(m, dep) for m, deps in graph.items() if m.startswith("gptserve.server")
               for dep in deps if dep.startswith("gptserve.engine")}
    assert {dep for _, dep in reached} <= ENGINE_FACE, sorted(reached)


def test_no_module_imports_itself_back_through_others():
    graph = _graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(" -> ".join(path + [start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    assert not cycles, "\n".join(cycles[:10])
