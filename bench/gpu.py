"""GPU figures: CUDA-graph decode latency vs the bandwidth floor, and throughput vs transformers.

Needs a CUDA GPU. For each shape (random weights of the real GPT-2 shapes, same weights
for both engines): batch-1 inter-token latency of our engine (CUDA graphs on) against the
floor (weight bytes / measured device copy bandwidth), and output tokens/s at 256
concurrent requests against transformers' batched generate on the same GPU, in one run.

    python bench/gpu.py --shapes gpt2 gpt2-xl --dtype bfloat16 --json bench/results/gpu.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
          "gpt2-xl": (1600, 48, 25)}


def device_bandwidth(nbytes: int = 2 * 2**30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # read + write


def make_checkpoint(shape: str, dtype: torch.dtype, folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    n_embd, n_layer, n_head = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).to(dtype)
    model.save_pretrained(folder)
    del model
    for f in ("vocab.json", "merges.txt"):
        (folder / f).write_bytes((DEFAULT_MODEL_DIR / f).read_bytes())


def ours(folder: Path, dtype: str, args) -> dict:
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(str(folder), EngineConfig(device="cuda", dtype=dtype, max_num_seqs=args.concurrency,
                                                 max_num_batched_tokens=8192))
    prompt = list(range(1000, 1000 + args.prompt_len))
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_tokens=16, **greedy))  # warm-up
    engine.add_request("itl", prompt, SamplingParams(max_tokens=args.decode_steps + 1, **greedy))
    engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    itl = (time.perf_counter() - t) / args.decode_steps
    prompts = [[(i * 7 + j) % 50000 for j in range(args.prompt_len)] for i in range(args.concurrency)]
    t = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_tokens=args.output_len, **greedy))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    tokens = sum(len(o[0]) for o in out)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {"itl_ms": itl * 1e3, "weight_bytes": weight_bytes, "tokens_per_s": tokens / elapsed,
            "graphs": engine.runner.graphs is not None}


def transformers_throughput(folder: Path, dtype: torch.dtype, args) -> dict:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype).cuda().eval()
    ids = torch.tensor([[(i * 7 + j) % 50000 for j in range(args.prompt_len)] for i in range(args.concurrency)],
                       device="cuda")
    with torch.inference_mode():
        model.generate(ids[:2], max_new_tokens=8, do_sample=False, pad_token_id=50256)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                             do_sample=False, pad_token_id=50256)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"tokens_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["gpt2", "gpt2-xl"], choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bw = device_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_bandwidth_GBps": bw / 1e9,
               "concurrency": args.concurrency, "shapes": {}}
    print(f"{results['device']}: copy bandwidth {bw / 1e9:.0f} GB/s")
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            make_checkpoint(shape, dtype, Path(tmp))
            r = ours(Path(tmp), args.dtype, args)
            torch.cuda.empty_cache()
            r["floor_ms"] = r["weight_bytes"] / bw * 1e3
            r["itl_vs_floor"] = r["itl_ms"] / r["floor_ms"]
            r["transformers"] = transformers_throughput(Path(tmp), dtype, args)
            r["throughput_ratio"] = r["tokens_per_s"] / r["transformers"]["tokens_per_s"]
            torch.cuda.empty_cache()
        results["shapes"][shape] = r
        print(f"{shape}: batch-1 ITL {r['itl_ms']:.2f} ms (floor {r['floor_ms']:.2f} ms, {r['itl_vs_floor']:.2f}x); "
              f"{args.concurrency} concurrent: {r['tokens_per_s']:.0f} tok/s vs transformers "
              f"{r['transformers']['tokens_per_s']:.0f} ({r['throughput_ratio']:.1f}x)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
