"""LoRA benchmark: serving throughput with requests spread over 1, 4 and 16 adapters, against
the base model alone, in the same server and the same run; and the time to load an adapter.

Random GPT-2 small weights (bench/compare.py's checkpoint) and rank-8 adapters made by peft
on them, updating every linear layer (c_attn, c_proj, c_fc and the MLP's c_proj), random A
and B (the cost of an adapter does not depend on its values). One server, started as
users would (`--lora-modules`, `--max-loras 16`, the default precision), driven by
bench/serve.py at concurrency 16 (streamed /v1/completions, greedy, ignore_eos), in rounds
that alternate the workloads: `base` sends every request to the model, `N adapters` spreads
them over N adapters in turn. Then, on a server with --enable-lora-runtime-updates, the time
of POST /v1/load_lora_adapter (reading, checking and holding an adapter) and of the first
request through it (which puts it in a slot).

Writes lora.json and lora.md (the table, ratios against `base` in the same round, the
commands) to --out. From the repository root, with nothing else running:

    python bench/lora.py                # -> bench/results/
    python bench/lora.py --quick
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
import serve as serve_bench  # noqa: E402

NUM_ADAPTERS = 16
SPREADS = (1, 4, 16)


def make_adapters(checkpoint: Path, work: Path, n: int, rank: int) -> list[Path]:
    """n peft adapters of rank `rank` on every linear layer, random A and B, saved once."""
    folders = [work / f"lora-r{rank}-{i}" for i in range(n)]
    missing = [f for f in folders if not (f / "adapter_model.safetensors").exists()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        for folder in missing:
            torch.manual_seed(folders.index(folder))
            model = get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
                fan_in_fan_out=True))
            model.save_pretrained(folder)
    return folders


def server_peer(checkpoint: Path, adapters: list[Path], args: argparse.Namespace, runtime_updates: bool) -> Peer:
    port = free_port()
    modules = [f"a{i}={folder}" for i, folder in enumerate(adapters)]
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(checkpoint), "--device", "cpu",
           "--served-model-name", "base", "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port),
           "--max-loras", str(NUM_ADAPTERS), "--max-lora-rank", str(args.rank),
           "--no-prefix-caching",  # every run prefills its prompts: the workloads send the same ones
           *args.server_args.split()]
    cmd += ["--enable-lora-runtime-updates"] if runtime_updates else ["--lora-modules", *modules]
    threads = str(args.threads)
    return Peer("gptserve", "gptserve", cmd, port, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})


def run_load(port: int, models: list[str], args: argparse.Namespace, label: str) -> dict:
    return serve_bench.main(["--base-url", f"http://127.0.0.1:{port}", "--models", ",".join(models),
                             "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
                             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                             "--disable-tqdm", "--label", label, "--warmup", "1"])


def throughput_rounds(checkpoint: Path, adapters: list[Path], args: argparse.Namespace, log_dir: Path) -> list[dict]:
    workloads = {"base": ["base"], **{f"{n} adapters": [f"a{i}" for i in range(n)] for n in SPREADS}}
    peer = server_peer(checkpoint, adapters, args, runtime_updates=False)
    rounds = []
    with Server(peer, log_dir / "lora-serve.log") as server:
        server.wait_ready(600)
        run_load(peer.port, [f"a{i}" for i in range(NUM_ADAPTERS)], args, "warm-up")  # every adapter in a slot
        for r in range(args.rounds):
            order = list(workloads) if r % 2 == 0 else list(reversed(workloads))
            rounds.append({name: run_load(peer.port, workloads[name], args, f"round {r} {name}") for name in order})
    return rounds, shown_command(peer.command)


def load_times(checkpoint: Path, adapters: list[Path], args: argparse.Namespace, log_dir: Path) -> dict:
    """Seconds to load each adapter through the endpoint, then to answer its first request
    (one token: the adapter goes into a slot) and a second one (already there)."""
    peer = server_peer(checkpoint, adapters, args, runtime_updates=True)
    loads, first, second = [], [], []
    with Server(peer, log_dir / "lora-load.log") as server:
        server.wait_ready(600)
        base = f"http://127.0.0.1:{peer.port}"
        with httpx.Client(base_url=base, timeout=120, trust_env=False) as http:
            for i, folder in enumerate(adapters[:args.load_samples]):
                start = time.perf_counter()
                r = http.post("/v1/load_lora_adapter", json={"lora_name": f"x{i}", "lora_path": str(folder)})
                loads.append(time.perf_counter() - start)
                r.raise_for_status()
                for times in (first, second):
                    start = time.perf_counter()
                    http.post("/v1/completions", json={"model": f"x{i}", "prompt": "Hello", "max_tokens": 1}
                              ).raise_for_status()
                    times.append(time.perf_counter() - start)
    return {"load_s": loads, "first_request_s": first, "second_request_s": second,
            "command": shown_command(peer.command)}


def report(rounds: list[dict], loads: dict, args: argparse.Namespace, command: str) -> str:
    lines = [f"CPU: {cpu_name()} ({', '.join(vector_flags())}), {args.threads} threads; GPT-2 small (random), "
             f"{NUM_ADAPTERS} rank-{args.rank} adapters on every linear layer; c={args.concurrency}, "
             f"{args.num_requests} requests of {args.input_len} prompt + {args.output_len} output tokens per run, "
             f"{args.rounds} rounds (median; ratio against base in each round, then the median)", "",
             "| workload | output tok/s | TPOT mean (ms) | TTFT p50 (ms) | vs base |", "|---|---|---|---|---|"]
    for name in rounds[0]:
        tps = statistics.median(r[name]["output_throughput"] for r in rounds)
        tpot = statistics.median(r[name]["tpot_ms"]["mean"] for r in rounds)
        ttft = statistics.median(r[name]["ttft_ms"]["p50"] for r in rounds)
        ratio = statistics.median(r[name]["output_throughput"] / r["base"]["output_throughput"] for r in rounds)
        lines.append(f"| {name} | {tps:.1f} | {tpot:.1f} | {ttft:.0f} | {ratio:.2f}x |")
    lines += ["", f"Loading an adapter (POST /v1/load_lora_adapter, {len(loads['load_s'])} adapters): median "
              f"{statistics.median(loads['load_s']) * 1000:.0f} ms; its first one-token request (into a slot) "
              f"{statistics.median(loads['first_request_s']) * 1000:.0f} ms, the next "
              f"{statistics.median(loads['second_request_s']) * 1000:.0f} ms.", "",
              f"Server: `{command}`", f"Loads: `{loads['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench", help="checkpoint and adapters, kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--load-samples", type=int, default=5)
    p.add_argument("--server-args", default="", help="more flags for gptserve serve")
    p.add_argument("--quick", action="store_true", help="fewer, shorter requests, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.num_requests, args.output_len, args.rounds, args.load_samples = 32, 32, 1, 3
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.work)
    adapters = make_adapters(checkpoint, args.work, NUM_ADAPTERS, args.rank)
    log_dir = Path(tempfile.mkdtemp(prefix="gptserve-lora-bench-"))
    rounds, command = throughput_rounds(checkpoint, adapters, args, log_dir)
    loads = load_times(checkpoint, adapters, args, log_dir)
    text = report(rounds, loads, args, command)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps({"rounds": rounds, "loads": loads, "command": command,
                                                    "args": {k: str(v).replace(f"{ROOT}/", "")
                                                             for k, v in vars(args).items()}}, indent=1))
    (args.out / "lora.md").write_text(text)


if __name__ == "__main__":
    main()
