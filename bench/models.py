"""Several models: the time to reload an evicted GPT-2 small.

Two copies of random GPT-2 small (bench/compare.py's checkpoint) served as `a` and `b` by one
server whose --models-memory holds one of them, at the default precision. A one-token
request to `a`, then to `b` (which evicts `a`), then to `a` again, in turn: each request
that finds its model unloaded pays its reload (read the checkpoint, convert the weights,
build the engine), and a second request to the same model shows the cost without it.
Writes models.json and models.md to --out. From the repository root, nothing else running:

    python bench/models.py            # -> bench/results/
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from compare import Peer, Server, cpu_name, free_port, make_checkpoint, shown_command, vector_flags  # noqa: E402


def timed(http: httpx.Client, model: str) -> float:
    start = time.perf_counter()
    http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1}).raise_for_status()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reloads", type=int, default=5)
    p.add_argument("--kv-cache-memory", default="256MiB")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.work)
    port = free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", f"a={checkpoint}", "--model", f"b={checkpoint}",
           "--device", "cpu", "--kv-cache-memory", args.kv_cache_memory, "--models-memory", "700MiB",
           "--host", "127.0.0.1", "--port", str(port)]
    threads = str(args.threads)
    peer = Peer("gptserve", "gptserve", cmd, port, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    reloads, warm = [], []
    with Server(peer, Path(tempfile.mkdtemp(prefix="gptserve-models-bench-")) / "serve.log") as server:
        server.wait_ready(600)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False) as http:
            timed(http, "a")  # the first load builds the CPU kernels' cache too: not counted
            for i in range(args.reloads):
                model = "ab"[(i + 1) % 2]
                reloads.append(timed(http, model))  # evicts the other
                warm.append(timed(http, model))
            states = {m["id"]: m["state"] for m in http.get("/v1/models").json()["data"]}
    text = (f"CPU: {cpu_name()} ({', '.join(vector_flags())}), {args.threads} threads. Two GPT-2 small models "
            f"(random), --models-memory holding one: a one-token request to the unloaded one (reload, then the "
            f"token) took median {statistics.median(reloads):.2f} s (min {min(reloads):.2f}, max {max(reloads):.2f}, "
            f"{len(reloads)} reloads); the same request once loaded {statistics.median(warm) * 1000:.0f} ms. "
            f"States at the end: {states}.\n\nServer: `{shown_command(cmd)}`\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps({"reload_s": reloads, "warm_s": warm, "states": states,
                                                      "command": shown_command(cmd)}, indent=1))
    (args.out / "models.md").write_text(text)


if __name__ == "__main__":
    main()
