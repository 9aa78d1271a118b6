"""bench/compare.py keeps a peer's row when its first build does not start: it starts the
fallback build, and the table says which ran and why; and it names the CPU it ran on."""
from __future__ import annotations

import importlib.util
import socket
import sys
import textwrap
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parents[1] / "bench" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("bench_compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSWERS = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b'{"data": []}')
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_a_build_that_never_answers_gives_way_to_the_fallback(compare, tmp_path):
    hang = compare.Peer("llamacpp-q8", "llama-server (native build)",
                        [sys.executable, "-c", "import time; time.sleep(60)"], free_port())
    port = free_port()
    fallback = compare.Peer("llamacpp-q8", "llama-server (portable build)",
                            [sys.executable, "-c", ANSWERS, str(port)], port)
    with compare.first_ready([hang, fallback], tmp_path, [2, 30]) as (server, notes):
        assert server.peer is fallback
        assert len(notes) == 1 and notes[0].startswith("llama-server (native build): llamacpp-q8 not ready after 2s")
    servers = {"llamacpp-q8": {"commands": {}, "notes": [f"concurrency [1]: {notes[0]}"]}}
    assert "llama.cpp Q8_0, concurrency [1]: llama-server (native build)" in compare.notes(servers)


def test_when_no_build_answers_the_error_says_why_for_each(compare, tmp_path):
    peers = [compare.Peer("llamacpp", f"build {i}", [sys.executable, "-c", "raise SystemExit(3)"], free_port())
             for i in range(2)]
    with pytest.raises(RuntimeError, match=r"build 0: llamacpp exited \(3\).*build 1: llamacpp exited \(3\)"):
        with compare.first_ready(peers, tmp_path, [10, 10]):
            pass


def test_the_table_names_the_cpu(compare):
    info = {"cpu": "Some CPU", "cpus": 2, "cpu_flags": compare.vector_flags(), "gptserve_kernels": "avx2"}
    line = compare.cpu_line(info)
    assert line.startswith("CPU: Some CPU, 2 cores seen; vector flags: ") and line.endswith("gptserve's kernels: avx2")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2 " in flags:
        assert "avx2" in info["cpu_flags"]
