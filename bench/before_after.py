"""Served latency and throughput of this checkout against an older one, in one run.

Starts `gptserve serve` from each checkout in turn on the same random-weight GPT-2 small
(bench/compare.py's checkpoint) and drives it with bench/serve.py at each concurrency:
rounds alternate which side goes first, so drift on the machine falls on both. Reports
each side's median over the rounds of output tokens/s, TTFT p50 and ITL p50, and
after/before. `--endpoint chat` goes through the chat template (and its implicit stop);
`--dtype auto` serves at the default precision (float32 otherwise).

    git worktree add .cache/before <commit>
    python bench/before_after.py --before .cache/before --json bench/results/before_after.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import CACHE, ROOT, Peer, Server, free_port, make_checkpoint  # noqa: E402


def run_side(args: argparse.Namespace, checkpoint: Path, source: Path, tag: str) -> dict[int, dict]:
    """One server from `source`, every concurrency level against it; serve.py's summaries."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(checkpoint), "--dtype", args.dtype,
           "--device", "cpu", "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port)]
    threads = str(args.threads)
    peer = Peer("gptserve", "gptserve", cmd, port, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, source)
    out = {}
    with Server(peer, args.work / f"server_{tag}.log") as server:
        server.wait_ready(args.ready_timeout)
        base = f"http://127.0.0.1:{port}"
        httpx.post(base + "/v1/completions", json={"prompt": "warm up", "max_tokens": 8}, timeout=120,
                   trust_env=False).raise_for_status()
        for c in args.concurrency:
            result = args.work / f"serve_{tag}_c{c}.json"
            subprocess.run([sys.executable, str(BENCH / "serve.py"), "--base-url", base, "--concurrency", str(c),
                            "--num-requests", str(max(args.min_requests, args.waves * c)),
                            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                            "--seed", "0", "--warmup", "0", "--result-file", str(result), "--disable-tqdm",
                            "--endpoint", args.endpoint],
                           check=True, stdout=subprocess.DEVNULL)
            out[c] = json.loads(result.read_text())
            out[c].pop("config", None)  # the command line, with this machine's paths
            print(f"{tag} c={c}: {out[c]['output_throughput']:.1f} tok/s, TTFT p50 "
                  f"{out[c]['ttft_ms']['p50']:.1f} ms, ITL p50 {out[c]['itl_ms']['p50']:.1f} ms", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="an older checkout (git worktree)")
    p.add_argument("--after", type=Path, default=ROOT, help="a newer checkout (default: this one)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", default=[1, 16], type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="auto: the precision `gptserve serve` picks on this CPU")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--waves", type=int, default=2, help="requests per client")
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", type=Path, default=CACHE / "bench" / "before_after")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(CACHE / "bench")
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[int, dict]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for side in order:
            runs[side].append(run_side(args, checkpoint, sides[side], f"{side}_r{r}"))
    table = ["| concurrency | output tok/s before | after | after/before | TTFT p50 ms before | after | "
             "after/before | ITL p50 ms before | after | after/before |", "|---|---|---|---|---|---|---|---|---|---|"]
    medians = {}
    for c in args.concurrency:
        m = {side: [statistics.median(run[c]["output_throughput"] for run in runs[side]),
                    statistics.median(run[c]["ttft_ms"]["p50"] for run in runs[side]),
                    statistics.median(run[c]["itl_ms"]["p50"] for run in runs[side])] for side in runs}
        medians[c] = m
        row = [f"{m['before'][i]:.1f} | {m['after'][i]:.1f} | {m['after'][i] / m['before'][i]:.2f}" for i in range(3)]
        table.append(f"| {c} | " + " | ".join(row) + " |")
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "runs": runs, "rounds": args.rounds,
                                         "endpoint": args.endpoint, "dtype": args.dtype,
                                         "input_len": args.input_len, "output_len": args.output_len}, indent=1))


if __name__ == "__main__":
    main()
