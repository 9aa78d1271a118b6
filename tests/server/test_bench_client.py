"""bench/serve.py, the load generator, drives every API the server speaks and counts what
it asked for: each request's output tokens, as the server's usage reports them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_SERVE = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH_SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("endpoint", ["completions", "chat", "responses", "messages"])
def test_the_load_generator_streams_every_api(server, bench_serve, endpoint: str):
    summary = bench_serve.main(["--base-url", server.base_url, "--endpoint", endpoint, "--num-requests", "3",
                                "--concurrency", "2", "--input-len", "8", "--output-len", "6", "--disable-tqdm"])
    assert summary["completed"] == 3 and summary["failed"] == 0, summary["errors"]
    assert summary["usage_reported"] == 3 and summary["wrong_output_len"] == 0
    assert summary["total_output_tokens"] == 18 and summary["ttft_ms"]["p50"] > 0
