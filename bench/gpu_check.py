"""The GPU path, checked and measured in one run (about 4 minutes on one H200).

Random weights of the real GPT-2 shapes (gpt2, gpt2-xl), the same weights for every side:
  (a) parity with transformers on the GPU, bfloat16 and float16: logits within the dtype's
      tolerance (twice transformers' own error against float32, at least 8 epsilons of the
      logit scale), greedy tokens equal over 64 steps (a divergence passes only at a
      genuine near-tie of transformers' own logits);
  (b) CUDA-graph decode gives the eager path's tokens, on the same batch;
  (c) batch-1 decode inter-token latency, graphs on and off, against the bandwidth floor
      (weight bytes over the card's measured device-to-device copy bandwidth);
  (d) offline throughput at 256 concurrent mixed-length requests against transformers'
      batched generate (left-padded, each batch to its longest output);
  (e) served throughput and TTFT at concurrency 1, 16, 64, 256 through `gptserve serve`
      and bench/serve.py;
  (f) LoRA adapters on the GPU (the Triton kernels of gptserve/model/triton_lora.py): three
      random rank-8 adapters in PEFT's layout: a batch mixing them with the base model gives
      each request's tokens alone, and each adapter changes the output.
It writes OUT.json and OUT.md (a markdown table), and exits 1 if a check failed.

Needs torch (a CUDA build), triton, transformers, and the engine's own packages (tiktoken,
llguidance, safetensors, huggingface_hub, numpy); step (e) also needs the server's
(fastapi, uvicorn, pydantic, sse-starlette, httpx, jinja2, prometheus-client, jsonschema,
platformdirs). Run it from a checkout; gptserve need not be installed. On a machine
without internet, bring the missing packages as wheels, made on a connected machine of the
same Python version and platform:

    pip download -d wheels tiktoken llguidance fastapi uvicorn pydantic sse-starlette httpx \\
        jinja2 prometheus-client jsonschema platformdirs

and pass `--wheels wheels`: what is missing is installed from there (pip --no-index).
Without --wheels, missing engine packages stop the run and missing server packages skip
(e), each with a message saying which.

    python bench/gpu_check.py --out bench/results/gpu_check
    python bench/gpu_check.py --device cpu --smoke --out smoke   # tiny shapes: the script's own test
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: gptserve need not be installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing to download

SHAPES = {"tiny": (64, 2, 4, 256), "gpt2": (768, 12, 12, 1024), "gpt2-xl": (1600, 48, 25, 1024)}
ENGINE_PACKAGES = {"tiktoken": "tiktoken", "llguidance": "llguidance", "safetensors": "safetensors",
                   "huggingface_hub": "huggingface_hub", "numpy": "numpy", "transformers": "transformers"}
SERVER_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic",
                   "sse_starlette": "sse-starlette", "httpx": "httpx", "jinja2": "jinja2",
                   "prometheus_client": "prometheus-client", "jsonschema": "jsonschema",
                   "platformdirs": "platformdirs"}
EPSILONS = 8  # the logits tolerance floor, in epsilons of the dtype times the logit scale


# ---------------------------------------------------------------- set-up

def missing(packages: dict[str, str]) -> list[str]:
    return [dist for module, dist in packages.items() if importlib.util.find_spec(module) is None]


def install(dists: list[str], wheels: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *dists],
                   check=True)
    importlib.invalidate_caches()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_checkpoint(shape: str, dtype: torch.dtype, device: torch.device, folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    n_embd, n_layer, n_head, n_positions = SHAPES[shape]
    torch.manual_seed(0)
    with device:
        model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                           n_positions=n_positions)).to(dtype)
    model.save_pretrained(folder)
    del model
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((DEFAULT_MODEL_DIR / name).read_bytes())
    return folder


def hf_model(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: neither stops nor suppresses EOS
    model.generation_config.pad_token_id = 50256
    return model


def engine(folder: Path, dtype: str, args, eager: bool = False):
    from gptserve.config import EngineConfig
    from gptserve.engine.cuda_graphs import DecodeGraphs
    from gptserve.engine.llm_engine import LLMEngine

    cfg = EngineConfig(device=args.device, dtype=dtype, max_num_seqs=args.concurrency,
                       max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=eager,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_memory=64 * 2**20 if args.device == "cpu" else None)
    e = LLMEngine(str(folder), cfg)
    if not eager and e.device.type == "cpu":
        # no CUDA graphs on the CPU (its own one-call decode step instead): run the graphs'
        # static buffers and padding uncaptured, to smoke-test them
        sizes = tuple(b for b in cfg.cuda_graph_batch_sizes if b <= cfg.max_num_seqs)
        e.runner.graphs = DecodeGraphs(e.model, e.pool, e.runner.max_blocks, sizes, capture=False)
    return e


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


def greedy(n: int):
    from gptserve.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


# ---------------------------------------------------------------- (a) parity

@torch.inference_mode()
def parity(folder: Path, dtype_name: str, reference: list[torch.Tensor], prompts, args) -> dict:
    from gptserve.model.attention import DenseAttention
    from gptserve.weights.loader import load_model

    dtype, device = getattr(torch, dtype_name), torch.device(args.device)
    hf = hf_model(folder, dtype, device)
    hf_logits = [hf(torch.tensor([p], device=device)).logits[0].float() for p in prompts]
    hf_tokens, hf_gaps = [], []
    for p in prompts:
        out = hf.generate(torch.tensor([p], device=device), max_new_tokens=args.greedy_steps, do_sample=False,
                          output_scores=True, return_dict_in_generate=True)
        hf_tokens.append(out.sequences[0, len(p):].tolist())
        top2 = torch.stack(out.scores)[:, 0].float().topk(2).values  # (steps, 2)
        hf_gaps.append((top2[:, 0] - top2[:, 1]).tolist())
    del hf
    free_memory()
    model = load_model(folder, device, dtype)
    ours = []
    for p in prompts:
        ids = torch.tensor(p, device=device)
        ours.append(model.logits(model(ids, torch.arange(len(p), device=device), DenseAttention(1))).float())
    del model
    free_memory()
    scale = max(r.abs().max().item() for r in reference)
    hf_err = max((h - r).abs().max().item() for h, r in zip(hf_logits, reference))
    our_err = max((o - r).abs().max().item() for o, r in zip(ours, reference))
    to_hf = max((o - h).abs().max().item() for o, h in zip(ours, hf_logits))
    tol = max(2 * hf_err, EPSILONS * torch.finfo(dtype).eps * scale, 1e-4 if dtype == torch.float32 else 0.0)

    e = engine(folder, dtype_name, args)
    our_tokens = [choices[0] for choices in e.generate(prompts, greedy(args.greedy_steps))]
    del e
    free_memory()
    equal_steps, near_ties_ok = [], True
    for mine, theirs, gaps in zip(our_tokens, hf_tokens, hf_gaps):
        k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(theirs))
        equal_steps.append(k)
        if k < len(theirs) and gaps[k] > tol:
            near_ties_ok = False
    ok = our_err <= tol and near_ties_ok
    return {"ok": ok, "max_err_vs_fp32": our_err, "transformers_err_vs_fp32": hf_err, "max_diff_vs_transformers": to_hf,
            "tolerance": tol, "logit_scale": scale, "greedy_equal_steps": equal_steps,
            "greedy_steps": args.greedy_steps}


# ---------------------------------------------------------------- (b), (c), (d)

def decode_tokens(e, prompts, args) -> list[list[int]]:
    return [choices[0] for choices in e.generate(prompts, greedy(args.greedy_steps // 2))]


def batch1_itl(e, args) -> float:
    """Seconds per decode step of one sequence (64-token prompt), timed over --itl-steps steps."""
    device = e.device
    prompt = prompts_of([64], seed=7)[0]
    e.generate([prompt], greedy(8))  # warm-up
    e.add_request("itl", prompt, greedy(args.itl_steps + 1))
    e.step()  # the prefill and the first token
    sync(device)
    start = time.perf_counter()
    while e.has_unfinished():
        e.step()
    sync(device)
    return (time.perf_counter() - start) / args.itl_steps


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write), best of 10."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def workload(args) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(1)
    n = args.concurrency
    prompt_lens = torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (n,), generator=g).tolist()
    outputs = torch.randint(args.output_len[0], args.output_len[1] + 1, (n,), generator=g).tolist()
    return prompts_of(prompt_lens, seed=2), outputs


def offline_ours(e, prompts, outputs) -> dict:
    from gptserve.engine.sampling_params import SamplingParams

    e.generate([prompts[0][:8]], greedy(4))  # warm-up
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    sync(e.device)
    start = time.perf_counter()
    out = e.generate(prompts, params)
    sync(e.device)
    elapsed = time.perf_counter() - start
    tokens = sum(len(choices[0]) for choices in out)
    assert tokens == sum(outputs)
    return {"seconds": elapsed, "tokens_per_s": tokens / elapsed}


@torch.inference_mode()
def offline_transformers(folder: Path, dtype: torch.dtype, prompts, outputs, args) -> dict:
    device = torch.device(args.device)
    hf = hf_model(folder, dtype, device)
    hf.generate(torch.tensor([prompts[0][:8]], device=device), max_new_tokens=4, do_sample=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch_size):
        batch, wanted = prompts[i:i + args.hf_batch_size], outputs[i:i + args.hf_batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), 50256, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for r, p in enumerate(batch):  # left padding
            ids[r, width - len(p):] = torch.tensor(p, device=device)
            mask[r, width - len(p):] = 1
        new = max(wanted)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert out.shape[1] == width + new
    sync(device)
    elapsed = time.perf_counter() - start
    del hf
    free_memory()
    return {"seconds": elapsed, "tokens_per_s": sum(outputs) / elapsed, "batch_size": args.hf_batch_size}


def engine_steps(folder: Path, dtype_name: str, args) -> dict:
    """(b), (c) and (d) for one shape: the graph engine first, then the eager one."""
    device = torch.device(args.device)
    batch = prompts_of([5, 17, 33, 64, 100, 3, 48, 70], seed=3)  # 8 rows: a captured batch size
    out: dict = {}
    e = engine(folder, dtype_name, args)
    captured = bool(e.runner.graphs is not None and e.runner.graphs.graphs)
    graph_tokens = decode_tokens(e, batch, args)
    itl_graphs = batch1_itl(e, args)
    weight_bytes = sum(p.numel() * p.element_size() for p in e.model.parameters())
    prompts, outputs = workload(args)
    ours = offline_ours(e, prompts, outputs)
    del e
    free_memory()
    e = engine(folder, dtype_name, args, eager=True)
    eager_tokens = decode_tokens(e, batch, args)
    itl_eager = batch1_itl(e, args)
    del e
    free_memory()
    equal = graph_tokens == eager_tokens
    out["graphs_vs_eager"] = {"ok": equal, "captured": captured, "rows": len(batch),
                              "first_difference": None if equal else next(
                                  i for i, (a, b) in enumerate(zip(graph_tokens, eager_tokens)) if a != b)}
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    floor = weight_bytes / bandwidth
    out["itl"] = {"weight_bytes": weight_bytes, "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": floor * 1e3,
                  "graphs_ms": itl_graphs * 1e3, "eager_ms": itl_eager * 1e3,
                  "graphs_vs_floor": itl_graphs / floor, "eager_vs_floor": itl_eager / floor}
    theirs = offline_transformers(folder, getattr(torch, dtype_name), prompts, outputs, args)
    out["offline"] = {"requests": len(prompts), "gptserve": ours, "transformers": theirs,
                      "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]}
    return out


# ---------------------------------------------------------------- (e) served

def lora_adapter(folder: Path, cfg, rank: int, seed: int) -> Path:
    """A random adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors) on
    every linear layer, B not zero, so that it changes the output."""
    from safetensors.torch import save_file

    from gptserve.model.lora import TARGETS, target_shape

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.n_layer):
        for target in TARGETS:
            fan_in, fan_out = target_shape(cfg, target)
            key = f"base_model.model.transformer.h.{layer}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) / rank ** 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": ["c_attn", "c_proj", "c_fc"]}))
    return folder


def lora_steps(folder: Path, dtype_name: str, args) -> dict:
    """(f): a batch mixing the base model and three adapters equals each request alone."""
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.weights.loader import read_config

    cfg = read_config(folder)
    adapters = {f"a{i}": str(lora_adapter(folder.parent / f"lora-{i}", cfg, 8, i)) for i in range(3)}
    e = LLMEngine(str(folder), EngineConfig(device=args.device, dtype=dtype_name, lora_modules=adapters, max_loras=4,
                                           gpu_memory_utilization=args.gpu_memory_utilization,
                                           kv_cache_memory=64 * 2**20 if args.device == "cpu" else None))
    prompts = prompts_of([9, 30, 17, 50], seed=3)
    names = [None, "a0", "a1", "a2"]
    params = [greedy(24) for _ in names]
    for p, name in zip(params, names):
        p.adapter = name
    alone = [e.generate([prompt], p)[0][0] for prompt, p in zip(prompts, params)]
    together = [r[0] for r in e.generate(prompts, params)]
    differs = len({tuple(t) for t in alone}) == len(alone)
    return {"ok": together == alone and differs, "batched_equals_alone": together == alone,
            "adapters_change_the_output": differs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(folder: Path, dtype_name: str, args, logs: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gptserve.cli", "serve", "--model", str(folder), "--device", args.device,
               "--dtype", dtype_name, "--port", str(port), "--max-num-seqs", str(max(args.serve_concurrency)),
               "--max-queued-requests", str(4 * max(args.serve_concurrency)),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.device == "cpu":
        command += ["--kv-cache-memory", "64MiB"]
    logs.mkdir(parents=True, exist_ok=True)
    # bench/serve.py imports gptserve from this checkout, which need not be installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results: dict = {}
    with open(logs / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(base, server, args.ready_timeout)
            for c in args.serve_concurrency:
                result_file = logs / f"serve_c{c}.json"
                subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--base-url", base,
                                "--concurrency", str(c), "--num-requests", str(max(args.min_requests, 2 * c)),
                                "--input-len", str(args.serve_input_len), "--output-len", str(args.serve_output_len),
                                "--vocab", str(folder), "--disable-tqdm", "--result-file", str(result_file)],
                               check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, timeout=600)
                s = json.loads(result_file.read_text())
                results[c] = {"output_tokens_per_s": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                              "ttft_p99_ms": s["ttft_ms"]["p99"], "itl_p50_ms": s["itl_ms"]["p50"],
                              "failed": s["failed"], "wrong_output_len": s["wrong_output_len"]}
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    ok = all(r["failed"] == 0 and r["wrong_output_len"] == 0 for r in results.values())
    return {"ok": ok, "by_concurrency": results}


def serve_skip_reason(args: argparse.Namespace) -> str | None:
    if args.skip_serve:
        return "--skip-serve"
    gone = missing(SERVER_PACKAGES)
    if gone:
        return f"the server's packages are missing ({', '.join(gone)}): pass --wheels DIR (see --help)"
    return None


def wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"gptserve serve exited with {server.returncode}; see server.log")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"gptserve serve not ready after {timeout:.0f} s; see server.log")


# ---------------------------------------------------------------- the run and its report

def run_step(results: dict, key: str, fn, *fn_args) -> None:
    """One step; its failure is recorded (and fails the run) without stopping the others."""
    start = time.perf_counter()
    try:
        results[key] = fn(*fn_args)
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the table
        traceback.print_exc()
        results[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    results[key]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(results[key], default=str)[:400]}", flush=True)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(table(report))


def table(report: dict) -> str:
    lines = [f"GPU check on {report['device_name']} (torch {report['torch']}, {report['seconds']:.0f} s)", "",
             "| step | shape | dtype | result | figures |", "|---|---|---|---|---|"]

    def row(step, shape, dtype, r, figures):
        verdict = "error: " + r["error"] if "error" in r else ("ok" if r.get("ok", True) else "FAIL")
        lines.append(f"| {step} | {shape} | {dtype} | {verdict} | {figures if 'error' not in r else ''} |")

    for key, r in report["steps"].items():
        step, shape, dtype = (key.split(":") + ["", ""])[:3]
        if step == "parity":
            row("(a) parity", shape, dtype, r, "" if "error" in r else
                f"max err {r['max_err_vs_fp32']:.3g} (transformers {r['transformers_err_vs_fp32']:.3g}, tol "
                f"{r['tolerance']:.3g}); greedy equal for {r['greedy_equal_steps']} of {r['greedy_steps']} steps")
        elif step == "engine" and "error" in r:
            row("(b)-(d)", shape, dtype, r, "")
        elif step == "engine":
            g, i, o = r["graphs_vs_eager"], r["itl"], r["offline"]
            row("(b) graphs = eager", shape, dtype, g, f"{g['rows']} rows, captured: {g['captured']}")
            lines.append(f"| (c) batch-1 ITL | {shape} | {dtype} | | graphs {i['graphs_ms']:.2f} ms "
                         f"({i['graphs_vs_floor']:.1f}x floor), eager {i['eager_ms']:.2f} ms "
                         f"({i['eager_vs_floor']:.1f}x); floor {i['floor_ms']:.3f} ms at "
                         f"{i['copy_bandwidth_GBps']:.0f} GB/s |")
            lines.append(f"| (d) offline, {o['requests']} concurrent | {shape} | {dtype} | | "
                         f"{o['gptserve']['tokens_per_s']:.0f} tok/s vs transformers "
                         f"{o['transformers']['tokens_per_s']:.0f} ({o['ratio']:.1f}x) |")
        elif step == "lora":
            row("(f) LoRA, mixed batch = alone", shape, dtype, r, "" if "error" in r else
                f"batched = alone: {r['batched_equals_alone']}; adapters change the output: "
                f"{r['adapters_change_the_output']}")
        elif step == "served" and ("error" in r or "skipped" in r):
            lines.append(f"| (e) served | {shape} | {dtype} | {r.get('error') or 'skipped: ' + r['skipped']} | |")
        elif step == "served":
            for c, s in r["by_concurrency"].items():
                lines.append(f"| (e) served, concurrency {c} | {shape} | {dtype} | "
                             f"{'ok' if s['failed'] == 0 and s['wrong_output_len'] == 0 else 'FAIL'} | "
                             f"{s['output_tokens_per_s']:.0f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
                             f"p99 {s['ttft_p99_ms']:.0f} ms, ITL p50 {s['itl_p50_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: checks the script itself")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check",
                    help="writes OUT.json and OUT.md, and OUT-logs/ (the server's log, bench/serve.py's results)")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="a folder of wheels to install missing packages from (see above)")
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float16", "float32"],
                    help="for the parity step; (b)-(e) run in the first")
    ap.add_argument("--serve-shape", default=None, choices=sorted(SHAPES), help="the shape (e) serves")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--hf-batch-size", type=int, default=None, help="transformers' batch (default: all at once)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.shapes = args.shapes or (["tiny"] if smoke else ["gpt2", "gpt2-xl"])
    args.dtypes = args.dtypes or (["float32"] if smoke else ["bfloat16", "float16"])
    args.serve_shape = args.serve_shape or args.shapes[-1]
    args.concurrency = 16 if smoke else 256
    args.hf_batch_size = args.hf_batch_size or args.concurrency
    args.prompt_len, args.output_len = ((4, 40), (4, 16)) if smoke else ((32, 256), (32, 256))
    args.greedy_steps = 16 if smoke else 64
    args.itl_steps = 8 if smoke else 128
    args.max_num_batched_tokens = 512 if smoke else 8192
    args.copy_bytes = 64 * 2**20 if smoke else 2 * 2**30
    args.serve_concurrency = [1, 4] if smoke else [1, 16, 64, 256]
    args.min_requests = 4 if smoke else 8
    args.serve_input_len, args.serve_output_len = (16, 8) if smoke else (128, 128)
    args.ready_timeout = 120 if smoke else 300
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --device cpu --smoke checks the script on the CPU", file=sys.stderr)
        return 2
    for group, packages in (("engine", ENGINE_PACKAGES), ("server", SERVER_PACKAGES)):
        if missing(packages) and args.wheels:
            install(missing(packages), args.wheels)
    if missing(ENGINE_PACKAGES):
        print(f"gpu_check: missing {', '.join(missing(ENGINE_PACKAGES))}: install them, or pass --wheels DIR "
              "(see --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    steps: dict = {}
    device = torch.device(args.device)
    report = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "smoke": args.smoke, "seconds": 0.0, "steps": steps}

    def step(key: str, fn, *fn_args) -> None:
        """run_step, then the report so far is written: a run cut short keeps the steps it finished."""
        run_step(steps, key, fn, *fn_args)
        report["seconds"] = time.perf_counter() - start
        write_report(report, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        prompts = prompts_of([7, 33, 64, 100] if not args.smoke else [7, 33], seed=0)
        for shape in args.shapes:
            saved = torch.float32 if "float32" in args.dtypes else torch.bfloat16  # every side reads these
            folder = make_checkpoint(shape, saved, device, Path(tmp) / shape)
            free_memory()
            with torch.inference_mode():
                ref = hf_model(folder, torch.float32, device)
                reference = [ref(torch.tensor([p], device=device)).logits[0].float() for p in prompts]
                del ref
                free_memory()
            for dtype in args.dtypes:
                step(f"parity:{shape}:{dtype}", parity, folder, dtype, reference, prompts, args)
            del reference
            free_memory()
            step(f"engine:{shape}:{args.dtypes[0]}", engine_steps, folder, args.dtypes[0], args)
            step(f"lora:{shape}:{args.dtypes[0]}", lora_steps, folder, args.dtypes[0], args)
            free_memory()  # the engine of (f) is gone: give its GPU memory back before (e)'s server
            if shape == args.serve_shape:
                why = serve_skip_reason(args)
                if why:
                    print(f"gpu_check: (e) skipped: {why}", flush=True)
                    steps[f"served:{shape}:{args.dtypes[0]}"] = {"skipped": why}
                else:
                    logs = args.out.parent / (args.out.name + "-logs")
                    step(f"served:{shape}:{args.dtypes[0]}", served, folder, args.dtypes[0], args, logs)
            free_memory()
    report["seconds"] = time.perf_counter() - start
    write_report(report, args.out)
    print(table(report))
    failed = [k for k, r in steps.items() if "error" in r or r.get("ok") is False
              or r.get("graphs_vs_eager", {}).get("ok") is False]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
