"""Offline throughput: our engine vs Hugging Face transformers on the same weights and work.

The same N requests (prompt and output lengths drawn with a fixed seed, ignore_eos so
lengths are fixed) run through gptserve's LLMEngine and through transformers' batched,
left-padded generate, on the same random-weight GPT-2, in one run. Also: decode
milliseconds per step at batch 1 against the memory-bandwidth floor, for each precision
(float32; bfloat16 and int8 weights): the bytes of the weights a step reads, as they are
held, over the machine's measured read bandwidth (a read-only pass, not a copy).

    python bench/offline.py --num-requests 64 --json bench/results/offline.json
    python bench/offline.py --skip-throughput --variants avx512_dot,avx512   # floors per kernel variant
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gptserve.model.cpu_kernels import panel_kernels

SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "tiny": (64, 2, 4)}


def make_checkpoint(shape: str, folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptserve.weights.loader import DEFAULT_MODEL_DIR

    n_embd, n_layer, n_head = SHAPES[shape]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt"):
        (folder / f).write_bytes((DEFAULT_MODEL_DIR / f).read_bytes())
    return folder


def workload(n: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]):
    g = torch.Generator().manual_seed(seed)
    prompts, outputs = [], []
    for _ in range(n):
        plen = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        prompts.append(torch.randint(0, 50000, (plen,), generator=g).tolist())
        outputs.append(int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g)))
    return prompts, outputs


def run_ours(path: Path, prompts, outputs, args) -> dict:
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams

    cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=4 * 2**30)
    engine = LLMEngine(str(path), cfg)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r[0]) for r in results)
    assert tokens == sum(outputs)
    return {"seconds": elapsed, "output_tokens": tokens, "tokens_per_s": tokens / elapsed}


def run_transformers(path: Path, prompts, outputs, args) -> dict:
    """HF generate in batches of `hf_batch_size`, left-padded; each batch runs to its longest output."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    order = list(range(len(prompts)))
    start = time.perf_counter()
    useful = 0
    for i in range(0, len(order), args.hf_batch_size):
        idx = order[i:i + args.hf_batch_size]
        width = max(len(prompts[j]) for j in idx)
        ids = torch.full((len(idx), width), 50256)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, width - len(prompts[j]):] = torch.tensor(prompts[j])
            mask[r, width - len(prompts[j]):] = 1
        new = max(outputs[j] for j in idx)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=50256)
        assert out.shape[1] == width + new
        useful += sum(outputs[j] for j in idx)  # tokens the requests asked for
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": useful, "tokens_per_s": useful / elapsed}


def read_bandwidth(nbytes: int = 1024 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of reading a large tensor once (a sum over it: no writes), with torch's threads."""
    src = torch.ones(nbytes // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every linear layer and the LM head, as held."""
    from gptserve.model.panel_linear import PanelLinear

    total = 0
    for m in model.modules():
        if isinstance(m, PanelLinear):
            total += m.weight_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += (m.in_features + 1) * m.out_features * 4
    return total


def decode_floor(path: Path, args, dtype: str, quantization: str | None, bandwidth: float) -> dict:
    """Batch-1 decode ms/step vs the time to stream the weights once from memory."""
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(str(path), EngineConfig(device="cpu", dtype=dtype, quantization=quantization,
                                               kv_cache_memory=2**30))
    prompt = list(range(100, 164))
    engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    n = args.decode_steps
    engine.add_request("d", prompt, SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True))
    engine.step()  # prefill
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    per_step = (time.perf_counter() - start) / n
    weight_bytes = streamed_weight_bytes(engine.model)
    floor = weight_bytes / bandwidth
    return {"precision": str(engine.precision), "ms_per_step": per_step * 1e3, "weight_bytes": weight_bytes,
            "read_bandwidth_GBps": bandwidth / 1e9, "floor_ms": floor * 1e3, "ratio_to_floor": per_step / floor}


PRECISIONS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "float16": ("float16", None),
              "int8": ("float32", "int8")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="only the batch-1 decode floors")
    ap.add_argument("--precisions", default="float32,bfloat16,int8",
                    help=f"batch-1 decode floors to measure, of {','.join(PRECISIONS)}")
    ap.add_argument("--variants", default=None,
                    help="CPU kernel variants to measure each precision under, interleaved (e.g. avx512_dot,avx512); "
                         "default: the one the CPU picks")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts, outputs = workload(args.num_requests, args.seed, tuple(args.prompt_len), tuple(args.output_len))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.shape, Path(tmp))
        result = {"shape": args.shape, "num_requests": args.num_requests, "threads": torch.get_num_threads(),
                  "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(outputs)}
        if not args.skip_throughput:
            result["gptserve"] = run_ours(path, prompts, outputs, args)
            print(f"gptserve:     {result['gptserve']['tokens_per_s']:8.1f} output tokens/s "
                  f"({result['gptserve']['seconds']:.1f} s)", flush=True)
        if not args.skip_hf and not args.skip_throughput:
            result["transformers"] = run_transformers(path, prompts, outputs, args)
            ratio = result["gptserve"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
            result["throughput_ratio"] = ratio
            print(f"transformers: {result['transformers']['tokens_per_s']:8.1f} output tokens/s "
                  f"({result['transformers']['seconds']:.1f} s, batch {args.hf_batch_size})")
            print(f"ratio:        {ratio:.2f}x")
        result["decode"] = []
        kernels = panel_kernels()
        variants = args.variants.split(",") if args.variants else [kernels.simd() if kernels else None]
        for name in args.precisions.split(","):
            for variant in variants:  # each beside the others, the bandwidth measured just before
                if variant:
                    kernels.use_variant(variant)
                d = decode_floor(path, args, *PRECISIONS[name], read_bandwidth())
                d["kernels"] = variant
                result["decode"].append(d)
                print(f"batch-1 decode, {d['precision']}, {variant} kernels: {d['ms_per_step']:.2f} ms/step; "
                      f"floor {d['floor_ms']:.2f} ms ({d['weight_bytes'] / 2**20:.0f} MiB at "
                      f"{d['read_bandwidth_GBps']:.1f} GB/s read); {d['ratio_to_floor']:.2f}x the floor", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
