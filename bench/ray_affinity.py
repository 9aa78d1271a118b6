"""Prefix-affinity routing against load-only routing, on a local Ray Serve fleet, in one run.

Two engine replicas (one CPU each) of a random-weight GPT-2 serve a chat-like workload: 8
long system prompts, each followed by many short user turns, sent turn by turn across
the 8 conversations (the order that thrashes a cache holding only some of them). Each
replica's KV cache holds about 5 of the system prompts. The same requests run through
the application twice, on fresh replicas: with the prefix-affinity router, then with
affinity off (power of two choices). Reported per mode: the fleet's prefix-cache hit
rate (cached prompt tokens over prompt tokens, from each response's usage), TTFT
percentiles, end-to-end time, and how the requests spread over the replicas.

    python bench/ray_affinity.py --json bench/results/ray_affinity.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from offline import make_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(num_prompts: int, turns: int, system_words: int, turn_words: int) -> list[str]:
    """Turn t of every conversation before turn t + 1 of any."""
    import random

    rng = random.Random(0)
    words = [w.strip() for w in (BENCH.parent / "README.md").read_text().split() if w.strip().isalpha()]
    systems = [f"System {i}: " + " ".join(rng.choices(words, k=system_words)) for i in range(num_prompts)]
    return [f"{systems[i]}\nUser turn {t}: " + " ".join(rng.choices(words, k=turn_words)) + "\nAssistant:"
            for t in range(turns) for i in range(num_prompts)]


async def one(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, usage, replica = None, None, ""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        replica = response.headers["x-gptserve-replica"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
    return {"ttft": ttft, "e2e": time.perf_counter() - start, "replica": replica,
            "prompt_tokens": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def drive(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(http: httpx.AsyncClient, prompt: str) -> dict:
        async with gate:
            return await one(http, prompt, max_tokens)

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(http, p) for p in prompts))
        return list(results), time.perf_counter() - start


def summarize(results: list[dict], duration: float) -> dict:
    ttfts = sorted(r["ttft"] * 1000 for r in results)
    q = statistics.quantiles(ttfts, n=100)
    return {"requests": len(results), "hit_rate": sum(r["cached"] for r in results) / sum(r["prompt_tokens"]
                                                                                         for r in results),
            "ttft_ms_mean": statistics.fmean(ttfts), "ttft_ms_p50": q[49], "ttft_ms_p90": q[89],
            "ttft_ms_p99": q[98], "duration_s": duration,
            "per_replica": sorted(Counter(r["replica"] for r in results).values(), reverse=True)}


def run_mode(model: Path, args: argparse.Namespace, prompts: list[str], affinity: bool, port: int) -> dict:
    from ray import serve

    from gptserve.config import EngineConfig, ServerConfig
    from gptserve.deploy.application import build_application
    from gptserve.deploy.spec import AppSpec, Routing, Scaling

    spec = AppSpec(str(model), EngineConfig(device="cpu", dtype="float32", kv_cache_memory=args.kv_cache_mib * 2**20),
                   ServerConfig(state_dir=tempfile.mkdtemp()), Scaling(num_replicas=2, num_cpus=1),
                   Routing(prefix_affinity=affinity))
    serve.run(build_application(spec), name="bench", route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    asyncio.run(drive(base_url, [f"warm up {i} " * 40 for i in range(4)], 4, 2))  # kernels, first-call costs
    results, duration = asyncio.run(drive(base_url, prompts, args.concurrency, args.max_tokens))
    serve.delete("bench")
    return summarize(results, duration)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt2", help="random weights of this GPT-2 shape (gpt2, gpt2-medium, tiny)")
    p.add_argument("--num-prompts", type=int, default=8, help="system prompts (conversations)")
    p.add_argument("--turns", type=int, default=8, help="user turns per system prompt")
    p.add_argument("--system-words", type=int, default=300, help="words of each system prompt (~1.3 tokens each)")
    p.add_argument("--turn-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-cache-mib", type=int, default=160, help="per replica: about 5 system prompts of gpt2")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import ray
    from ray import serve

    prompts = workload(args.num_prompts, args.turns, args.system_words, args.turn_words)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(args.shape, Path(tmp) / args.shape)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            report = {"affinity": run_mode(model, args, prompts, True, port),
                      "power_of_two": run_mode(model, args, prompts, False, port)}
        finally:
            serve.shutdown()
            ray.shutdown()
    report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"{'routing':<14}{'hit rate':>9}{'TTFT mean':>11}{'p50':>8}{'p90':>8}{'p99':>8}{'total s':>9}  per replica")
    for name in ("affinity", "power_of_two"):
        r = report[name]
        print(f"{name:<14}{r['hit_rate']:>9.1%}{r['ttft_ms_mean']:>9.0f}ms{r['ttft_ms_p50']:>6.0f}ms"
              f"{r['ttft_ms_p90']:>6.0f}ms{r['ttft_ms_p99']:>6.0f}ms{r['duration_s']:>9.1f}  {r['per_replica']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
