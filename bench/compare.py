"""Serving comparison: gptserve vs llama.cpp's server vs a naive transformers server, at
each precision.

One run reproduces it all: makes a random-weight GPT-2 small checkpoint (seed 0,
float32) and its GGUF twins in F32, BF16 and Q8_0 (llama.cpp's own converter and
quantizer), then for each server: starts it on 127.0.0.1, waits until it answers, times
prompt processing (a 512-token prompt, alone) and runs bench/serve.py at each concurrency
(same synthetic workload, ignore_eos, streamed /v1/completions), stops it. gptserve runs
in float32, with bfloat16 weights and with int8 weights (float32 math); llama-server is
started per level as its users would start it: one slot per client (`-np`), a context
that fits them, the same threads. Writes `serving.json`, `throughput.png`,
`p99_latency.png` and `serving.md` (the tables, gptserve against llama.cpp at the same
precision, and every server's exact command) to --out.

Build the llama.cpp peer first (minutes): bench/build_llamacpp.sh (into .cache/llamacpp,
where --llamacpp-dir looks by default). Where a native llama.cpp build of some precision
does not start (seen: Q8_0 hanging after its thread pool starts, with AMX), a second,
portable build is tried (`NATIVE=OFF bench/build_llamacpp.sh .cache/llamacpp-portable`: the
CPU's AVX2/AVX-512 flags on, AMX off), and the table says which build ran. The table names
the CPU (model and vector flags) it ran on. From the repository root:

    python bench/compare.py               # concurrency 1, 4, 16, 64 -> bench/results/
    python bench/compare.py --quick       # the same table with fewer, shorter requests
    python bench/compare.py --peers gptserve,gptserve-bf16,gptserve-int8   # gptserve alone
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = ROOT / ".cache"  # built and generated files, not committed (.gitignore)
sys.path.insert(0, str(BENCH))

PEER_TITLES = {"gptserve": "gptserve", "gptserve-bf16": "gptserve bfloat16 weights",
               "gptserve-int8": "gptserve int8 weights", "llamacpp": "llama.cpp", "llamacpp-bf16": "llama.cpp BF16",
               "llamacpp-q8": "llama.cpp Q8_0", "hf": "naive HF"}
# llama.cpp's peers by precision: the GGUF type its converter writes
LLAMACPP_OUTTYPE = {"llamacpp": "f32", "llamacpp-bf16": "bf16", "llamacpp-q8": "q8_0"}
SAME_PRECISION = {"gptserve": "llamacpp", "gptserve-bf16": "llamacpp-bf16", "gptserve-int8": "llamacpp-q8"}
SLOT_TOKENS = 1024  # llama-server's context per slot: the longest prompt (512, prefill test) and output fit
# gptserve's peers by precision: float32, and 16- or 8-bit weights with float32 math
GPTSERVE_PRECISION = {"gptserve": ["--dtype", "float32"], "gptserve-bf16": ["--dtype", "bfloat16"],
                      "gptserve-int8": ["--quantization", "int8"]}


@dataclass
class Peer:
    name: str  # gptserve (-bf16, -int8) | llamacpp | hf
    impl: str  # what actually runs, e.g. "llama-server" or "llama-cpp-python"
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT  # `python -m gptserve.cli` imports the gptserve found here first


# ---------------------------------------------------------------- model files

def make_checkpoint(work: Path) -> Path:
    """Random GPT-2 small (torch.manual_seed(0), float32) in HF layout, with our vocab."""
    from offline import make_checkpoint as make  # bench/offline.py: the shared recipe

    folder = work / "gpt2-random"
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        make("gpt2", folder)
    # transformers 5 no longer writes n_ctx; the Hub's gpt2 config.json has it and
    # llama.cpp's converter reads it
    config = json.loads((folder / "config.json").read_text())
    if "n_ctx" not in config:
        config["n_ctx"] = config["n_positions"]
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def make_gguf(checkpoint: Path, llamacpp_src: Path, work: Path, outtype: str = "f32") -> Path:
    """GGUF in `outtype` (f32, bf16, q8_0) through llama.cpp's own convert_hf_to_gguf.py (its
    vendored gguf-py), which quantizes to Q8_0 itself."""
    gguf = work / f"gpt2-random-{outtype}.gguf"
    if not gguf.exists() or gguf.stat().st_mtime < (checkpoint / "model.safetensors").stat().st_mtime:
        convert = llamacpp_src / "convert_hf_to_gguf.py"
        run([sys.executable, str(convert), str(checkpoint), "--outtype", outtype, "--outfile", str(gguf)],
            work / f"convert-{outtype}.log")
    return gguf


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_peer(args: argparse.Namespace, name: str, checkpoint: Path, ggufs: dict[str, Path],
              concurrency: int, portable: bool = False) -> Peer:
    """The server `name` set up as its users would for `concurrency` clients: llama-server
    with one slot per client and a context that fits them (so one server per level); the
    others batch on their own (one server for every level)."""
    threads = str(args.threads)
    # torch's pools and llama.cpp's -t get the same core count
    torch_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    port = free_port()
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name in GPTSERVE_PRECISION:
        cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(checkpoint),
               *GPTSERVE_PRECISION[name], "--device", "cpu",
               "--max-num-seqs", str(max(64, max(args.concurrency))), *host]
        return Peer(name, PEER_TITLES[name], cmd, port, torch_env)
    if name == "hf":
        cmd = [sys.executable, str(BENCH / "hf_server.py"), "--model", str(checkpoint), "--threads", threads, *host]
        return Peer(name, "transformers, one request at a time", cmd, port, torch_env)
    if name in LLAMACPP_OUTTYPE:
        gguf = ggufs[name]
        binary = llama_server(args.llamacpp_portable_dir if portable else args.llamacpp_dir)
        if binary.exists() and not args.llama_cpp_python:
            # one slot per client, each with SLOT_TOKENS of context; K/V in f32 as ours
            cmd = [str(binary), "-m", str(gguf), *host, "-t", threads, "-tb", threads,
                   "-np", str(concurrency), "-c", str(concurrency * SLOT_TOKENS), "-cb",
                   "-ctk", "f32", "-ctv", "f32", "--no-webui", "-a", "gpt2-random", *args.llama_args.split()]
            build = "portable build" if portable else "native build"
            return Peer(name, f"llama-server ({build}), {concurrency} slots", cmd, port)
        # llama-cpp-python's server runs one request at a time; by default a waiting
        # request cuts the running stream short, hence --interrupt_requests False
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), *host, "--n_ctx", "1024",
               "--n_threads", threads, "--n_threads_batch", threads, "--model_alias", "gpt2-random",
               "--interrupt_requests", "False"]
        return Peer(name, "llama-cpp-python server, serialised", cmd, port)
    raise SystemExit(f"unknown peer {name!r}")


def llama_server(build_dir: Path) -> Path:
    return build_dir / "build" / "bin" / "llama-server"


def server_levels(name: str, levels: list[int]) -> list[list[int]]:
    """The levels each server of `name` runs: llama-server is started per level."""
    return [[c] for c in levels] if name in LLAMACPP_OUTTYPE else [levels]


class Server:
    """A peer's process in its own process group: started on enter, always stopped on exit."""

    def __init__(self, peer: Peer, log: Path):
        self.peer, self.log = peer, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.peer.env}
        with open(self.log, "w") as f:
            f.write(" ".join(self.peer.command) + "\n")
            f.flush()
            self.proc = subprocess.Popen(self.peer.command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.peer.cwd, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> None:
        base = f"http://127.0.0.1:{self.peer.port}"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited ({self.proc.returncode}); see {self.log}")
            try:  # llama-server answers 503 while loading
                if httpx.get(base + "/v1/models", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.peer.name} not ready after {timeout:.0f}s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def first_ready(peers: list[Peer], log_dir: Path, timeouts: list[float]):
    """Starts each of `peers` in turn (a server, then its fallbacks) until one answers within
    its timeout; yields (server, notes: why each earlier one was passed over). Raises
    RuntimeError when none does."""
    notes: list[str] = []
    for peer, timeout in zip(peers, timeouts):
        with Server(peer, log_dir / f"{peer.name}_port{peer.port}.log") as server:
            try:
                server.wait_ready(timeout)
            except RuntimeError as exc:
                notes.append(f"{peer.impl}: {exc}")
                continue
            yield server, notes
            return
    raise RuntimeError("; ".join(notes))


# ---------------------------------------------------------------- one level

PREFILL_LEN = 512  # prompt tokens of the prompt-processing test

def num_requests(args: argparse.Namespace, concurrency: int) -> int:
    """At least `--waves` requests per client, and at least --min-requests."""
    return max(args.min_requests, args.waves * concurrency)


def bench_level(args: argparse.Namespace, peer: Peer, concurrency: int, raw: Path,
                prefill: bool = False) -> dict:
    """serve.py at one level; `prefill`: instead, prompt processing (PREFILL_LEN-token prompts,
    4 output tokens, alone), whose TTFT is the prefill time."""
    result = raw / f"{peer.name}_{'prefill' if prefill else f'c{concurrency}'}.json"
    input_len, output_len, ratio = (PREFILL_LEN, 4, 0.0) if prefill else (args.input_len, args.output_len,
                                                                           args.range_ratio)
    cmd = [sys.executable, str(BENCH / "serve.py"), "--base-url", f"http://127.0.0.1:{peer.port}",
           "--endpoint", "completions", "--concurrency", str(concurrency),
           "--num-requests", str(4 if prefill else num_requests(args, concurrency)), "--input-len", str(input_len),
           "--output-len", str(output_len), "--range-ratio", str(ratio),
           "--prompt-format", args.prompt_format, "--seed", str(args.seed), "--warmup", "1",
           "--max-duration", str(args.max_duration), "--result-file", str(result), "--label", peer.name]
    if peer.impl.startswith("llama-cpp-python"):
        cmd.append("--eos-logit-bias")  # it has no ignore_eos
    load = os.getloadavg()[0]
    what = f"prompt processing, {PREFILL_LEN}-token prompts" if prefill else (
        f"concurrency {concurrency}, {num_requests(args, concurrency)} requests")
    print(f"\n## {PEER_TITLES[peer.name]} ({peer.impl}), {what}, load average {load:.2f}", flush=True)
    done = subprocess.run(cmd, timeout=args.max_duration + 300)
    if done.returncode != 0:
        return {"error": f"serve.py exited {done.returncode}", "load_average_before": load}
    summary = json.loads(result.read_text())
    summary.pop("config", None)
    summary["load_average_before"] = load
    return summary


# ---------------------------------------------------------------- the report

def metric(res: dict, key: str, stat: str | None = None) -> float | None:
    if "error" in res:
        return None
    return res[key][stat] if stat else res[key]


def markdown_table(results: dict, levels: list[int]) -> str:
    """One row per server and level; gptserve's rows compared with llama.cpp at the same
    precision (F32 / BF16 / Q8_0 against float32 / bfloat16 / int8 weights)."""
    head = ("| concurrency | server | output tok/s | req/s | TTFT p50 / p99 (ms) | ITL p50 (ms) | "
            "E2E p99 (ms) | failed | tok/s vs llama.cpp, same precision | TTFT p99 vs llama.cpp | "
            "tok/s vs gptserve float32 | tok/s vs naive HF |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(x: float | None, spec: str = ".0f") -> str:
        return "n/a" if x is None else format(x, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a"

    for c in levels:
        def at(name: str, key: str, stat: str | None = None) -> float | None:
            return metric(results.get(name, {}).get(str(c), {"error": 1}), key, stat)

        for name, by_level in results.items():
            res = by_level.get(str(c), {"error": "not run"})
            tput = metric(res, "output_throughput")
            peer = SAME_PRECISION.get(name)
            ttft = f"{fmt(metric(res, 'ttft_ms', 'p50'))} / {fmt(metric(res, 'ttft_ms', 'p99'))}"
            failed = "n/a" if "error" in res else f"{res['failed'] + res.get('cancelled', 0)}"
            lines.append(f"| {c} | {PEER_TITLES[name]} | {fmt(tput, '.1f')} | "
                         f"{fmt(metric(res, 'request_throughput'), '.2f')} | {ttft} | "
                         f"{fmt(metric(res, 'itl_ms', 'p50'), '.1f')} | {fmt(metric(res, 'e2el_ms', 'p99'))} | "
                         f"{failed} | {ratio(tput, at(peer, 'output_throughput')) if peer else 'n/a'} | "
                         f"{ratio(metric(res, 'ttft_ms', 'p99'), at(peer, 'ttft_ms', 'p99')) if peer else 'n/a'} | "
                         f"{ratio(tput, at('gptserve', 'output_throughput'))} | "
                         f"{ratio(tput, at('hf', 'output_throughput'))} |")
    return "\n".join(lines)


def prefill_table(results: dict) -> str:
    lines = [f"| server | TTFT p50 of a {PREFILL_LEN}-token prompt, alone (ms) | vs llama.cpp, same precision |",
             "|---|---|---|"]
    for name, by_level in results.items():
        res = by_level.get("prefill")
        if res is None:
            continue
        ttft = metric(res, "ttft_ms", "p50")
        peer = results.get(SAME_PRECISION.get(name, ""), {}).get("prefill")
        base = metric(peer, "ttft_ms", "p50") if peer else None
        lines.append(f"| {PEER_TITLES[name]} | {'n/a' if ttft is None else f'{ttft:.0f}'} | "
                     f"{f'{ttft / base:.2f}x' if ttft and base else 'n/a'} |")
    return "\n".join(lines)


def notes(servers: dict) -> str:
    """Why a server ran a fallback build, or did not run at all."""
    lines = [f"- {PEER_TITLES[name]}, {note}" for name, info in servers.items() for note in info.get("notes", [])]
    return "Notes:\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def shown_command(cmd: list[str]) -> str:
    """A command as the results show it: paths relative to the repository, python as `python`."""
    parts = ["python" if part == sys.executable else part.replace(f"{ROOT}/", "") for part in cmd]
    return " ".join(parts)


def commands(servers: dict) -> str:
    """Each server's exact command, per level where it was started per level."""
    lines = ["Commands:", ""]
    for name, info in servers.items():
        for levels, cmd in info["commands"].items():
            shown = " ".join(Path(part).name if "/" in part else part for part in cmd)
            lines.append(f"- {PEER_TITLES[name]}, concurrency {levels}: `{shown}`")
    return "\n".join(lines)


def plots(results: dict, levels: list[int], out: Path, subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")  # minor ticks: 2s, 5s
    subtitle = textwrap.fill(subtitle, 80)

    def concurrency_axis(ax) -> None:
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(NullLocator())

    def series(name: str, key: str, stat: str | None = None):
        xs, ys = [], []
        for c in levels:
            v = metric(results[name].get(str(c), {"error": 1}), key, stat)
            if v is not None:
                xs.append(c)
                ys.append(v)
        return xs, ys

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name in results:
        ax.plot(*series(name, "output_throughput"), marker="o", label=PEER_TITLES[name])
    concurrency_axis(ax)
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Output throughput")
    ax.set_ylim(bottom=0)
    fig.suptitle(subtitle, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in ((axes[0], "ttft_ms", "p99 time to first token"),
                           (axes[1], "e2el_ms", "p99 end-to-end latency")):
        for name in results:
            xs, ys = series(name, key, "p99")
            ax.plot(xs, [y / 1000 for y in ys], marker="o", label=PEER_TITLES[name])
        concurrency_axis(ax)
        ax.set(yscale="log", xlabel="concurrent requests", ylabel="seconds", title=title)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "p99_latency.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def versions(args: argparse.Namespace) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        cpu = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else None
    except OSError:
        pass
    info["cpu_flags"] = vector_flags()
    from gptserve.model.cpu_kernels import cpu_kernel_variant

    info["gptserve_kernels"] = cpu_kernel_variant()
    import torch
    import transformers
    info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["gptserve_commit"] = git.stdout.strip()
    binary = args.llamacpp_dir / "build" / "bin" / "llama-server"
    if binary.exists():
        v = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        info["llama_server"] = (v.stdout + v.stderr).strip().splitlines()[-2:]
    return info


VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8")


def cpu_name() -> str:
    """The CPU's model name (Linux), to print beside every figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def vector_flags() -> list[str]:
    """The CPU's vector instruction sets that matter to these kernels (Linux's names)."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in VECTOR_FLAGS if f in flags]


def cpu_line(info: dict) -> str:
    return (f"CPU: {info.get('cpu') or platform.processor() or 'unknown'}, {info.get('cpus')} cores seen; "
            f"vector flags: {' '.join(info.get('cpu_flags') or []) or 'none'}; "
            f"gptserve's kernels: {info.get('gptserve_kernels')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every level, fewer and shorter requests: 64 in / 32 out tokens, one request per client")
    p.add_argument("--skip-prefill", action="store_true", help="no 512-token prompt-processing test")
    p.add_argument("--peers", default="gptserve,gptserve-bf16,gptserve-int8,llamacpp,llamacpp-bf16,llamacpp-q8,hf",
                   type=lambda s: s.split(","), help=f"of {','.join(PEER_TITLES)}")
    p.add_argument("--concurrency", default=None, type=lambda s: [int(x) for x in s.split(",")],
                   help="levels (default 1,4,16,64; quick: 1,4)")
    p.add_argument("--input-len", type=int, default=None, help="mean prompt tokens (default 128; quick 32)")
    p.add_argument("--output-len", type=int, default=None, help="mean output tokens (default 128; quick 16)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in L*(1±r)")
    p.add_argument("--prompt-format", choices=["text", "ids"], default="text")
    p.add_argument("--waves", type=int, default=None, help="requests per client at each level (default 2; quick 1)")
    p.add_argument("--min-requests", type=int, default=None, help="fewest requests at a level (default 8; quick 2)")
    p.add_argument("--max-duration", type=float, default=900, help="seconds per level before requests are cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every server")
    p.add_argument("--llamacpp-dir", type=Path, default=CACHE / "llamacpp",
                   help="where bench/build_llamacpp.sh built llama.cpp (default .cache/llamacpp)")
    p.add_argument("--llamacpp-portable-dir", type=Path, default=CACHE / "llamacpp-portable",
                   help="a second llama.cpp build (NATIVE=OFF bench/build_llamacpp.sh DIR), tried where the "
                        "native one does not start (default .cache/llamacpp-portable)")
    p.add_argument("--llamacpp-start-timeout", type=float, default=60,
                   help="seconds for a llama.cpp build to start before the portable build is tried")
    p.add_argument("--llama-cpp-python", action="store_true", help="use llama-cpp-python's server for llama.cpp")
    p.add_argument("--llama-args", default="", help="extra llama-server flags, e.g. '--poll 0'")
    p.add_argument("--work", type=Path, default=CACHE / "bench",
                   help="checkpoint, GGUF, logs, raw results (default .cache/bench)")
    p.add_argument("--out", type=Path, default=None, help="default bench/results (quick: bench/results/quick)")
    p.add_argument("--ready-timeout", type=float, default=300)
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or [1, 4, 16, 64]
    args.input_len = args.input_len or (64 if quick else 128)
    args.output_len = args.output_len or (32 if quick else 128)
    args.waves = args.waves or (1 if quick else 2)
    args.min_requests = args.min_requests or (4 if quick else 8)
    args.out = args.out or (BENCH / "results" / ("quick" if quick else ""))
    return args


def interrupted(signum: int, frame) -> None:
    """A SIGTERM (e.g. from `timeout`) unwinds through the `with Server` blocks, as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupted)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    raw, logs = args.work / "raw", args.work / "logs"
    raw.mkdir(exist_ok=True)
    checkpoint = make_checkpoint(args.work)
    ggufs: dict[str, Path] = {}
    if any(name in LLAMACPP_OUTTYPE for name in args.peers):
        src = args.llamacpp_dir / "src"
        if not (src / "convert_hf_to_gguf.py").exists():
            raise SystemExit(f"no llama.cpp in {args.llamacpp_dir}: run bench/build_llamacpp.sh first "
                             "(or --peers gptserve,hf)")
        ggufs = {name: make_gguf(checkpoint, src, args.work, LLAMACPP_OUTTYPE[name])
                 for name in args.peers if name in LLAMACPP_OUTTYPE}

    results: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    started = time.time()
    for name in args.peers:
        results[name], servers[name] = {}, {"commands": {}}
        for levels in server_levels(name, args.concurrency):
            candidates = [make_peer(args, name, checkpoint, ggufs, max(levels))]
            timeouts = [args.ready_timeout]
            if name in LLAMACPP_OUTTYPE and not args.llama_cpp_python:
                timeouts = [args.llamacpp_start_timeout]
                if llama_server(args.llamacpp_portable_dir).exists():
                    candidates.append(make_peer(args, name, checkpoint, ggufs, max(levels), portable=True))
                    timeouts.append(args.llamacpp_start_timeout)
            try:
                with first_ready(candidates, logs, timeouts) as (server, passed_over):
                    peer = server.peer
                    servers[name]["impl"] = peer.impl
                    servers[name]["commands"][",".join(map(str, levels))] = peer.command
                    for note in passed_over:
                        servers[name].setdefault("notes", []).append(f"concurrency {levels}: {note}")
                    if 1 in levels and not args.skip_prefill:
                        results[name]["prefill"] = bench_level(args, peer, 1, raw, prefill=True)
                    for c in levels:
                        results[name][str(c)] = bench_level(args, peer, c, raw)
            except RuntimeError as exc:  # one peer failing doesn't lose the others: its rows say why
                print(f"!! {name}: {exc}", file=sys.stderr)
                servers[name].setdefault("notes", []).append(f"concurrency {levels}: did not run: {exc}")
                for c in levels:
                    results[name].setdefault(str(c), {"error": str(exc)})

    workload = (f"GPT-2 small, random weights, float32, {args.threads} threads; prompts {args.input_len}±"
                f"{args.range_ratio:.0%}, outputs {args.output_len}±{args.range_ratio:.0%} tokens (ignore_eos)")
    record = {
        "workload": workload,
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": time.time() - started,
        "versions": versions(args),
        "servers": servers,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    (args.out / "serving.json").write_text(json.dumps(record, indent=2))
    table = (markdown_table(results, args.concurrency) + "\n\n" + prefill_table(results) + "\n\n"
             + notes(servers) + commands(servers))
    workload = f"{workload}\n\n{cpu_line(record['versions'])}"
    (args.out / "serving.md").write_text(f"{workload}\n\n{table}\n")
    plots(results, args.concurrency, args.out, workload + (" [quick smoke run]" if args.quick else ""))
    print(f"\n{workload}{' [quick smoke run]' if args.quick else ''}\n\n{table}\n")
    print(f"wrote {args.out}/serving.json, serving.md, throughput.png, p99_latency.png "
          f"in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
