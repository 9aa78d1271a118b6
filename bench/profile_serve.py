"""Where a served token's time goes: py-spy on a live gptserve under bench/serve.py load.

For each concurrency level: starts `gptserve serve` on a random-weight GPT-2 small
(the checkpoint bench/compare.py uses), runs one warm-up request, then samples the
server with py-spy (`record -f raw --threads --idle`) while bench/serve.py drives a
closed-loop streaming load, and sorts every sample of the two threads that matter:

- the engine thread (`gptserve-engine`): idle (waiting for work), the model forward,
  the LM head, and each piece of the step outside them (sampler, input tensors,
  scheduling, token bookkeeping, detokenization, hand-off to the event loop);
- the event loop (uvicorn's main thread): idle (in select) or busy, and where.

The headline is the share of the engine's busy time outside the model math (forward and
LM head), and the event loop's busy share of the wall time.

    python bench/profile_serve.py --concurrency 1,16,64 --json bench/results/profile.json
    git worktree add .cache/before <commit>    # then a before/after, interleaved:
    python bench/profile_serve.py --before .cache/before --json bench/results/profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import CACHE, ROOT, Peer, Server, free_port, make_checkpoint  # noqa: E402

# (category, pattern on a frame "func (file:line)"), most specific first: a sample goes
# to the first category any of its frames matches
ENGINE_CATEGORIES = [
    ("idle", re.compile(r"^(Event|Condition)\.wait \(threading\.py")),
    ("LM head", re.compile(r"^GPT2\.logits \(.*gptserve/model/gpt2\.py")),
    ("model forward", re.compile(r"\(.*gptserve/model/(gpt2|attention|cpu_kernels|panel_linear)\.py")),
    ("sampler", re.compile(r"\(.*gptserve/engine/sampler\.py")),
    ("input tensors", re.compile(r"\(.*gptserve/engine/(model_runner|cuda_graphs)\.py")),
    ("scheduling, KV blocks", re.compile(r"\(.*gptserve/engine/(scheduler|block_manager)\.py")),
    ("detokenization, stop strings", re.compile(r"\(.*gptserve/engine/detokenizer\.py")),
    ("hand-off to the event loop", re.compile(r"^AsyncEngine\._(deliver|drain_commands)")),
    ("token bookkeeping, outputs", re.compile(r"\(.*gptserve/engine/")),
]
LOOP_CATEGORIES = [
    ("idle", re.compile(r"select \(selectors\.py")),
    ("chunk building, JSON", re.compile(r"\(.*gptserve/server/openai/serving_(chat|completion)\.py")),
    ("SSE sending", re.compile(r"\(.*sse_starlette/")),
    ("request parsing, routing", re.compile(r"\(.*(fastapi|starlette|pydantic)/")),
    ("HTTP protocol", re.compile(r"\(.*(uvicorn|h11|httptools)/")),
    ("gptserve plumbing", re.compile(r"\(.*gptserve/")),
    ("asyncio", re.compile(r"\(.*asyncio/")),
]
MODEL_MATH = ("model forward", "LM head")
PRECISIONS = {  # --precision: the server flags
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8": ["--dtype", "float32", "--quantization", "int8"],
}


def categorise(frames: list[str], categories) -> str:
    for name, pattern in categories:
        if any(pattern.search(f) for f in frames):
            return name
    return "other"


def parse_raw(path: Path) -> dict[str, Counter]:
    """py-spy raw lines: 'thread (tid): name;frame;frame ... count' -> per-thread-kind counters."""
    counts = {"engine": Counter(), "loop": Counter()}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        if "gptserve-engine" in thread:
            counts["engine"][categorise(frames[1:], ENGINE_CATEGORIES)] += int(n)
        elif "MainThread" in thread:
            counts["loop"][categorise(frames[1:], LOOP_CATEGORIES)] += int(n)
    return counts


def summarise(counts: dict[str, Counter]) -> dict:
    engine, loop = counts["engine"], counts["loop"]
    busy = sum(n for k, n in engine.items() if k != "idle")
    outside = sum(n for k, n in engine.items() if k not in ("idle", *MODEL_MATH))
    loop_total = sum(loop.values())
    loop_busy = loop_total - loop["idle"]
    return {
        "engine_samples": sum(engine.values()),
        "engine_busy_samples": busy,
        "engine_outside_model_samples": outside,
        "loop_busy_samples": loop_busy,
        "engine_busy_share_of_wall": busy / max(1, sum(engine.values())),
        "engine_outside_model_share": outside / max(1, busy),
        "engine_breakdown": {k: n / max(1, busy) for k, n in engine.most_common() if k != "idle"},
        "loop_samples": loop_total,
        "loop_busy_share_of_wall": loop_busy / max(1, loop_total),
        "loop_breakdown": {k: n / max(1, loop_busy) for k, n in loop.most_common() if k != "idle"},
    }


def profile_level(args: argparse.Namespace, checkpoint: Path, concurrency: int, label: str, source: Path) -> dict:
    port = free_port()
    threads = str(args.threads)
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(checkpoint), *PRECISIONS[args.precision],
           "--device", "cpu", "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port)]
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    peer = Peer("gptserve", "gptserve", cmd, port, env, source)
    work = args.work / "profile"
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{label}_c{concurrency}"
    raw, result = work / f"pyspy_{tag}.txt", work / f"serve_{tag}.json"
    with Server(peer, work / f"server_{tag}.log") as server:
        server.wait_ready(args.ready_timeout)
        base = f"http://127.0.0.1:{port}"
        httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 8}, timeout=120,
                   trust_env=False).raise_for_status()
        spy = subprocess.Popen(["py-spy", "record", "-p", str(server.proc.pid), "-f", "raw", "--threads",
                                "--idle", "--nonblocking", "-r", str(args.rate), "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # py-spy attaches
        load = [sys.executable, str(BENCH / "serve.py"), "--base-url", base, "--endpoint", args.endpoint,
                "--concurrency", str(concurrency), "--num-requests", str(args.waves * concurrency),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                "--seed", "0", "--warmup", "0", "--result-file", str(result), "--disable-tqdm"]
        subprocess.run(load, check=True)
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing (is ptrace allowed?):\n{err}")
    served = json.loads(result.read_text())
    summary = summarise(parse_raw(raw))
    # absolute cost per generated token (a share alone grows when the model gets faster)
    per_token_ms = 1000 / args.rate / served["total_output_tokens"]
    summary.update(engine_outside_model_ms_per_token=summary["engine_outside_model_samples"] * per_token_ms,
                   loop_busy_ms_per_token=summary["loop_busy_samples"] * per_token_ms)
    summary.update(label=label, source=str(source), concurrency=concurrency, precision=args.precision,
                   output_throughput=served["output_throughput"],
                   itl_p50_ms=served["itl_ms"]["p50"], ttft_p50_ms=served["ttft_ms"]["p50"])
    return summary


def report(levels: list[dict]) -> str:
    lines = []
    for s in levels:
        lines.append(f"\n## {s['label']}, {s['precision']}, concurrency {s['concurrency']}: {s['output_throughput']:.1f} output tok/s, "
                     f"ITL p50 {s['itl_p50_ms']:.1f} ms, TTFT p50 {s['ttft_p50_ms']:.0f} ms")
        lines.append(f"engine thread busy {s['engine_busy_share_of_wall']:.1%} of wall "
                     f"({s['engine_busy_samples']} samples); outside the model math: "
                     f"{s['engine_outside_model_share']:.1%} of its busy time")
        for k, v in s["engine_breakdown"].items():
            lines.append(f"  {k:34s} {v:6.1%}")
        lines.append(f"  = {s['engine_outside_model_ms_per_token']:.2f} ms per output token")
        lines.append(f"event loop busy {s['loop_busy_share_of_wall']:.1%} of wall "
                     f"({s['loop_busy_ms_per_token']:.2f} ms per output token)")
        for k, v in s["loop_breakdown"].items():
            lines.append(f"  {k:34s} {v:6.1%}")
    return "\n".join(lines)


def before_after_table(levels: list[dict]) -> str:
    """Markdown: each concurrency's before and after side by side."""
    by = {(s["label"], s["concurrency"]): s for s in levels}
    rows = ["| concurrency | output tok/s | ITL p50 (ms) | engine busy time outside the model math "
            "(per output token) | event loop busy, share of wall (per output token) |", "|---|---|---|---|---|"]
    for c in sorted({s["concurrency"] for s in levels}):
        b, a = by.get(("before", c)), by.get(("after", c))
        if not (a and b):
            continue
        rows.append(f"| {c} | {b['output_throughput']:.1f} -> {a['output_throughput']:.1f} "
                    f"({a['output_throughput'] / b['output_throughput']:.2f}x) | "
                    f"{b['itl_p50_ms']:.1f} -> {a['itl_p50_ms']:.1f} | "
                    f"{b['engine_outside_model_share']:.1%} -> {a['engine_outside_model_share']:.1%} "
                    f"({b['engine_outside_model_ms_per_token']:.2f} -> {a['engine_outside_model_ms_per_token']:.2f} ms) | "
                    f"{b['loop_busy_share_of_wall']:.1%} -> {a['loop_busy_share_of_wall']:.1%} "
                    f"({b['loop_busy_ms_per_token']:.2f} -> {a['loop_busy_ms_per_token']:.2f} ms) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default=[1, 16, 64], type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--precision", choices=list(PRECISIONS), default="float32", help="the served weights")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--waves", type=int, default=2, help="requests per client")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", type=Path, default=CACHE / "bench", help="checkpoint and logs (default .cache/bench)")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--json", type=Path, help="write the summaries here")
    p.add_argument("--raw", type=Path, help="only re-read this py-spy raw file and print its summary")
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="also profile the gptserve in DIR (e.g. `git worktree add DIR <commit>`), "
                        "interleaved with this checkout level by level: a before/after in one run")
    args = p.parse_args(argv)
    if args.raw:
        print(json.dumps(summarise(parse_raw(args.raw)), indent=2))
        return
    checkpoint = make_checkpoint(args.work)
    sources = ([("before", args.before.resolve())] if args.before else []) + [("after" if args.before else "this", ROOT)]
    levels = [profile_level(args, checkpoint, c, label, source)
              for c in args.concurrency for label, source in sources]
    print(report(levels))
    if args.before:
        print("\n" + before_after_table(levels))
    if args.json:
        commits = {label: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                                         text=True).stdout.strip() for label, source in sources}
        args.json.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                         "commits": commits, "levels": levels}, indent=2))


if __name__ == "__main__":
    main()
