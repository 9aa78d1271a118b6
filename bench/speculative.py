"""Speculative decoding benchmark: gptserve served without it and with each method.

One run, same weights (the bundled model, and for `draft` its bundled draft). Each server
is started in turn on 127.0.0.1 and driven by bench/serve.py (streamed /v1/completions,
greedy, ignore_eos), in rounds, so that the sides of a comparison alternate:

- held-out: continuations of text the model never trained on (the end of Revelation,
  which scripts/train_default_model.py holds out), at concurrency 1: the draft's case;
- copy: prompts whose answer repeats the prompt (a passage, a blank line, then its first
  words again, as in "rewrite this"), at concurrency 1: n-gram's case;
- load: the held-out prompts at concurrency 4, 8 and 16, for the servers as configured
  and for servers that speculate whatever the batch (`*-always`), which is how the rule
  that switches speculation off above `--speculative-max-batch` decoding sequences is
  chosen.

Writes speculative.json and speculative.md (the tables, ratios against plain decoding
measured in the same round, and every server's command) to --out. From the repository
root, with nothing else running:

    python bench/speculative.py                 # -> bench/results/
    python bench/speculative.py --quick         # fewer, shorter requests
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import Peer, Server, free_port  # noqa: E402
import serve as serve_bench  # noqa: E402

# Revelation 21-22 (KJV): in the held-out end of the bundled model's corpus
HELD_OUT = [
    "And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away;",
    "And I John saw the holy city, new Jerusalem, coming down from God out of heaven,",
    "And God shall wipe away all tears from their eyes; and there shall be no more death,",
    "And he that sat upon the throne said, Behold, I make all things new. And he said unto me,",
    "And the city had no need of the sun, neither of the moon, to shine in it:",
    "And he shewed me a pure river of water of life, clear as crystal, proceeding out of the throne",
    "And there shall be no night there; and they need no candle, neither light of the sun;",
    "Blessed are they that do his commandments, that they may have right to the tree of life,",
]
# passages to repeat: the answer copies the prompt
COPY = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me "
    "beside the still waters. He restoreth my soul: he leadeth me in the paths of righteousness.",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they that mourn: for "
    "they shall be comforted. Blessed are the meek: for they shall inherit the earth.",
    "Let not your heart be troubled: ye believe in God, believe also in me. In my Father's house are many "
    "mansions: if it were not so, I would have told you. I go to prepare a place for you.",
]

CONFIGS = {  # name: extra server flags
    "plain": [],
    "ngram": ["--speculative-method", "ngram"],
    "draft": ["--speculative-method", "draft"],
    "ngram-always": ["--speculative-method", "ngram", "--speculative-max-batch", "1024"],
    "draft-always": ["--speculative-method", "draft", "--speculative-max-batch", "1024"],
}
C1_CONFIGS = ("plain", "ngram", "draft")  # the -always servers differ only above the max batch


def workload_file(folder: Path, name: str, prompts: list[str], output_len: int) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": output_len}) + "\n" for p in prompts))
    return path


def copy_prompts() -> list[str]:
    return [f"{text}\n\n{' '.join(text.split()[:6])}" for text in COPY]


def run_load(port: int, dataset: Path, concurrency: int, num_requests: int, label: str, temperature: float) -> dict:
    return serve_bench.main(["--base-url", f"http://127.0.0.1:{port}", "--dataset", str(dataset),
                             "--concurrency", str(concurrency), "--num-requests", str(num_requests),
                             "--temperature", str(temperature), "--disable-tqdm", "--label", label, "--warmup", "1"])


def spec_counters(port: int) -> dict:
    import httpx
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    out = {}
    for line in text.splitlines():
        for key in ("num_draft_tokens", "num_accepted_tokens"):
            if line.startswith(f"gptserve_spec_decode_{key}") and not line.startswith("#"):
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_config(name: str, args: argparse.Namespace, files: dict[str, Path], log_dir: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--device", "cpu", "--max-num-seqs", "64",
           "--host", "127.0.0.1", "--port", str(port), *CONFIGS[name], *args.server_args.split()]
    peer = Peer(name, "gptserve", cmd, port, {"OMP_NUM_THREADS": str(args.threads)})
    result = {"command": " ".join(cmd[1:]), "runs": {}}
    with Server(peer, log_dir / f"{name}.log") as server:
        server.wait_ready(300)
        if name in C1_CONFIGS and not args.no_c1:
            for workload in ("held-out", "copy"):
                before = spec_counters(port)
                summary = run_load(port, files[workload], 1, args.c1_requests, f"{name} {workload}", args.temperature)
                after = spec_counters(port)
                summary["spec"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                result["runs"][f"{workload} c=1"] = summary
        for c in args.load_levels:
            result["runs"][f"held-out c={c}"] = run_load(port, files["held-out"], c, args.load_requests_per_stream * c,
                                                         f"{name} c={c}", args.temperature)
    return result


def median_of(rounds: list[dict], name: str, run: str, key: str) -> float | None:
    """The median over rounds of a summary figure; `key` may be "tpot_ms.mean"."""
    values = []
    for r in rounds:
        value = r[name]["runs"][run]
        for part in key.split("."):
            value = value[part]
        values.append(value)
    return statistics.median(values)


def report(rounds: list[dict], args: argparse.Namespace) -> str:
    sampling = "greedy" if not args.temperature else f"temperature {args.temperature}"
    lines = [f"Bundled model, {sampling}, {args.output_len} output tokens, CPU with {args.threads} threads, "
             f"median of {len(rounds)} rounds (servers alternate within a round).", ""]
    lines += ["TPOT: time per output token after the first. A stream's events may carry several tokens "
              "when guesses stand, so the gap between events (ITL) is reported at p99 too.", "",
              "| workload | server | output tok/s | ratio to plain | TPOT mean ms | ITL p99 ms | guesses accepted |",
              "|---|---|---|---|---|---|---|"]
    for workload in ("held-out", "copy") if not args.no_c1 else ():
        run = f"{workload} c=1"
        base = median_of(rounds, "plain", run, "output_throughput")
        for name in [n for n in C1_CONFIGS if n in args.configs]:
            tps = median_of(rounds, name, run, "output_throughput")
            itl = median_of(rounds, name, run, "tpot_ms.mean")
            p99 = median_of(rounds, name, run, "itl_ms.p99")
            spec = rounds[-1][name]["runs"][run].get("spec", {})
            drafted, accepted = spec.get("num_draft_tokens", 0), spec.get("num_accepted_tokens", 0)
            rate = f"{accepted / drafted:.0%} of {drafted:.0f}" if drafted else "-"
            lines.append(f"| {workload}, c=1 | {name} | {tps:.1f} | {tps / base:.2f}x | {itl:.2f} | {p99:.2f} | {rate} |")
    lines += ["", "| concurrency | " + " | ".join(args.configs) + " |", "|---|" + "---|" * len(args.configs)]
    for c in args.load_levels:
        run = f"held-out c={c}"
        base = median_of(rounds, "plain", run, "output_throughput")
        cells = [f"{median_of(rounds, n, run, 'output_throughput'):.0f} tok/s "
                 f"({median_of(rounds, n, run, 'output_throughput') / base:.2f}x)" for n in args.configs]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (`python -m gptserve.cli ...`):", ""]
    lines += [f"- {name}: `{rounds[0][name]['command']}`" for name in args.configs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--c1-requests", type=int, default=8)
    p.add_argument("--load-levels", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--load-requests-per-stream", type=int, default=3)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="the servers to run (plain is the baseline of every ratio)")
    p.add_argument("--no-c1", action="store_true", help="only the load levels")
    p.add_argument("--server-args", default="", help="more flags for every server, e.g. \"--model gpt2-xl "
                   "--device cuda --draft-model distilgpt2\" (the last flag wins)")
    p.add_argument("--quick", action="store_true", help="1 round, 64-token outputs, fewer requests")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.output_len, args.c1_requests, args.load_requests_per_stream = 1, 64, 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"held-out": workload_file(folder, "held-out", HELD_OUT, args.output_len),
                 "copy": workload_file(folder, "copy", copy_prompts(), args.output_len)}
        rounds = []
        for i in range(args.rounds):
            rounds.append({name: run_config(name, args, files, folder / f"round{i}") for name in args.configs})
            print(f"round {i + 1}/{args.rounds} done", flush=True)
    table = report(rounds, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.md").write_text(table)
    (args.out / "speculative.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(),
         "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
         "rounds": rounds}, indent=1) + "\n")
    print(f"wrote {args.out / 'speculative.md'} and speculative.json", file=sys.stderr)


if __name__ == "__main__":
    main()
