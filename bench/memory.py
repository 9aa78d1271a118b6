"""Resident memory per precision: gptserve's server against llama.cpp's on the same weights.

For each peer: start the server on 127.0.0.1 with a small KV cache (gptserve
--kv-cache-memory 64MiB; llama-server one slot of 1,024 tokens), serve one request of 32
tokens, then read the process's resident set (VmRSS) and its peak (VmHWM) from /proc, and
the peak of its anonymous memory while it started (sampled; see AnonPeak). The
model's memory is that RSS minus an empty process's: Python with torch imported, for
gptserve (llama.cpp's own baseline is a few MB and is not subtracted). Also the model's
tensor bytes as held (the engine's weights, no KV) for gptserve, against the checkpoint's
float32 bytes. GPT-2 small by default; --shape gpt2-medium for the 355M shape.

    python bench/memory.py --json bench/results/memory.json
    python bench/memory.py --shape gpt2-medium --json bench/results/memory_medium.json

llama.cpp's peers need bench/build_llamacpp.sh first (as bench/compare.py does); without
that build they are skipped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import (CACHE, LLAMACPP_OUTTYPE, GPTSERVE_PRECISION, PEER_TITLES, Peer, Server,  # noqa: E402
                     cpu_line, free_port, llama_server, make_gguf, versions)
from offline import make_checkpoint  # noqa: E402

KV = "64MiB"


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and RssAnon of `pid`, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


class AnonPeak(threading.Thread):
    """The largest anonymous resident memory of `pid` seen while it starts (sampled every 10
    ms): the peak RSS also counts the checkpoint file's pages, mapped while it is read,
    which the system can drop; anonymous memory it cannot."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            try:
                self.peak = max(self.peak, status(self.pid)["RssAnon"])
            except (OSError, KeyError):
                return


def baseline() -> int:
    """RSS of an idle Python with torch imported (and its thread pool started)."""
    code = "import torch, time, sys; torch.ones(8) @ torch.ones(8); print('ready', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        time.sleep(0.5)
        return status(proc.pid)["VmRSS"]
    finally:
        proc.kill()
        proc.wait()


def held_bytes(checkpoint: Path, name: str) -> tuple[int, int]:
    """(the engine's model tensor bytes as held, the checkpoint's float32 bytes)."""
    import torch

    from gptserve.engine.placement import resolve_precision
    from gptserve.model.panel_linear import panels_for_cpu
    from gptserve.weights.loader import load_model

    model = load_model(checkpoint)
    float32 = sum(p.numel() * 4 for p in model.parameters())
    flags = GPTSERVE_PRECISION[name]
    quantization = flags[1] if flags[0] == "--quantization" else None
    dtype = flags[1] if flags[0] == "--dtype" else "float32"
    panels_for_cpu(model, resolve_precision(dtype, quantization, torch.device("cpu")).weights)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()), float32


def served_rss(peer: Peer, log: Path, model_name: str) -> dict[str, int]:
    with Server(peer, log) as server:
        sampler = AnonPeak(server.proc.pid)
        sampler.start()
        server.wait_ready(300)
        sampler.done.set()
        r = httpx.post(f"http://127.0.0.1:{peer.port}/v1/completions", timeout=120, trust_env=False,
                       json={"model": model_name, "prompt": "The quick brown fox", "max_tokens": 32,
                             "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        time.sleep(0.5)
        return {**status(server.proc.pid), "anon_peak": sampler.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=["gpt2", "gpt2-medium"])
    ap.add_argument("--peers", default="gptserve,gptserve-bf16,gptserve-int8,llamacpp,llamacpp-bf16,llamacpp-q8",
                    type=lambda s: s.split(","))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-dir", type=Path, default=CACHE / "llamacpp")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.llamacpp_portable_dir = CACHE / "llamacpp-portable"
    args.llama_cpp_python = False
    work = Path(tempfile.mkdtemp(prefix="gptserve-memory-"))
    folder = work / args.shape
    folder.mkdir()
    make_checkpoint(args.shape, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])  # llama.cpp's converter reads it
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    base = baseline()
    rows = []
    print(f"{args.shape}; empty Python with torch: {base / 2**20:.0f} MiB RSS")
    for name in args.peers:
        if name in LLAMACPP_OUTTYPE:
            if not llama_server(args.llamacpp_dir).exists():
                print(f"{name}: skipped, no llama.cpp build in {args.llamacpp_dir}")
                continue
            gguf = make_gguf(folder, args.llamacpp_dir / "src", work, LLAMACPP_OUTTYPE[name])
            port = free_port()
            cmd = [str(llama_server(args.llamacpp_dir)), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                   "-t", str(args.threads), "-np", "1", "-c", "1024", "-ctk", "f32", "-ctv", "f32", "--no-webui",
                   "-a", "m"]
            rss = served_rss(Peer(name, "llama-server", cmd, port), work / f"{name}.log", "m")
            row = {"peer": name, "rss": rss["VmRSS"], "peak": rss["VmHWM"], "anon_peak": rss["anon_peak"],
                   "model_memory": rss["VmRSS"]}
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(folder), *GPTSERVE_PRECISION[name],
                   "--device", "cpu", "--kv-cache-memory", KV, "--host", "127.0.0.1", "--port", str(port)]
            env = {"OMP_NUM_THREADS": str(args.threads)}
            rss = served_rss(Peer(name, "gptserve", cmd, port, env), work / f"{name}.log", str(folder))
            held, float32 = held_bytes(folder, name)
            row = {"peer": name, "rss": rss["VmRSS"], "peak": rss["VmHWM"], "anon_peak": rss["anon_peak"],
                   "model_memory": rss["VmRSS"] - base, "tensor_bytes": held, "checkpoint_float32_bytes": float32}
        rows.append(row)
        print(f"{PEER_TITLES[name]:<28} RSS {row['rss'] / 2**20:7.0f} MiB (peak {row['peak'] / 2**20:6.0f}, "
              f"anonymous {row['anon_peak'] / 2**20:5.0f}); "
              f"model memory {row['model_memory'] / 2**20:6.0f} MiB"
              + (f"; tensors {row['tensor_bytes'] / 2**20:.0f} MiB of the checkpoint's float32 "
                 f"{row['checkpoint_float32_bytes'] / 2**20:.0f} MiB" if "tensor_bytes" in row else ""), flush=True)
    info = versions(args)
    print(cpu_line(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "baseline_rss": base, "kv_cache": KV,
                                               "versions": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
