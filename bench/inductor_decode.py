"""Batch-1 CPU decode: gptserve's one-call C++ step against TorchInductor's CPU backend.

The maintained way to fuse a decode step on the CPU is torch.compile: Inductor generates C++
for the step's element-wise work and calls oneDNN/MKL for the matmuls, with `freezing`
(weights folded as constants and pre-packed) and the C++ wrapper (no Python between kernels).
This times, on the same random GPT-2 weights in float32, one decode token at batch 1:

  - gptserve: the engine's decode step (`LLMEngine.step`, the C++ `DecodeStack`, sampling
    included), as bench/offline.py times it;
  - eager: a plain PyTorch decode step with a static KV cache (what Inductor is given);
  - inductor: that function through `torch.compile` with freezing and the C++ wrapper.

The eager and compiled functions attend over the whole static cache with a mask (static
shapes, as Inductor wants them); the context is short, so the weights dominate.

    python bench/inductor_decode.py --json bench/results/inductor_decode.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import SHAPES, make_checkpoint  # noqa: E402 - the same random checkpoint as bench/offline.py

def decode_step_fn(sd: dict[str, torch.Tensor], n_layer: int, n_head: int, max_len: int):
    """A plain decode step for one token: (token (1,), pos (1,), k_cache, v_cache) -> (logits, k, v);
    the caches (layers, H, max_len, D) are returned updated (functional, for torch.compile)."""
    p = {k.removeprefix("transformer."): v for k, v in sd.items()}
    C = p["wte.weight"].shape[1]
    D = C // n_head
    pos_ids = torch.arange(max_len)

    def step(token, pos, k_cache, v_cache):
        x = p["wte.weight"].index_select(0, token) + p["wpe.weight"].index_select(0, pos)  # (1, C)
        mask = (pos_ids <= pos).view(1, 1, max_len)
        ks, vs = [], []
        for i in range(n_layer):
            h = F.layer_norm(x, (C,), p[f"h.{i}.ln_1.weight"], p[f"h.{i}.ln_1.bias"])
            qkv = h @ p[f"h.{i}.attn.c_attn.weight"] + p[f"h.{i}.attn.c_attn.bias"]  # Conv1D: (C, 3C)
            q, k, v = qkv.view(3, n_head, D).unbind(0)
            kc = torch.where(pos_ids.view(1, max_len, 1) == pos, k.view(n_head, 1, D), k_cache[i])
            vc = torch.where(pos_ids.view(1, max_len, 1) == pos, v.view(n_head, 1, D), v_cache[i])
            ks.append(kc)
            vs.append(vc)
            scores = (q.view(n_head, 1, D) @ kc.transpose(1, 2)) / D ** 0.5  # (H, 1, T)
            att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vc  # (H, 1, D)
            x = x + att.reshape(1, C) @ p[f"h.{i}.attn.c_proj.weight"] + p[f"h.{i}.attn.c_proj.bias"]
            h = F.layer_norm(x, (C,), p[f"h.{i}.ln_2.weight"], p[f"h.{i}.ln_2.bias"])
            h = F.gelu(h @ p[f"h.{i}.mlp.c_fc.weight"] + p[f"h.{i}.mlp.c_fc.bias"], approximate="tanh")
            x = x + h @ p[f"h.{i}.mlp.c_proj.weight"] + p[f"h.{i}.mlp.c_proj.bias"]
        x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"])
        return x @ p["wte.weight"].T, torch.stack(ks), torch.stack(vs)

    return step


def time_steps(step, n_layer: int, n_head: int, C: int, max_len: int, start: int, steps: int) -> tuple[float, list[int]]:
    """ms per greedy step from position `start`, and the tokens chosen."""
    k = torch.zeros(n_layer, n_head, max_len, C // n_head)
    v = torch.zeros_like(k)
    token, tokens = torch.tensor([100]), []
    for pos in range(start):  # fill the cache (untimed)
        _, k, v = step(token, torch.tensor([pos]), k, v)
    t = time.perf_counter()
    for pos in range(start, start + steps):
        logits, k, v = step(token, torch.tensor([pos]), k, v)
        token = logits.argmax(-1)
        tokens.append(int(token))
    return (time.perf_counter() - t) / steps * 1e3, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=["gpt2", "tiny"])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=64, help="tokens in the cache before the timed steps")
    ap.add_argument("--json")
    args = ap.parse_args()
    from safetensors.torch import load_file

    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine
    from gptserve.engine.sampling_params import SamplingParams
    from gptserve.model.cpu_kernels import cpu_kernel_variant

    C, n_layer, n_head = SHAPES[args.shape]
    max_len = args.context + args.steps + 1
    result = {"shape": args.shape, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "kernels": cpu_kernel_variant(), "context": args.context, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.shape, Path(tmp))
        sd = load_file(str(path / "model.safetensors"))
        engine = LLMEngine(str(path), EngineConfig(device="cpu", dtype="float32", kv_cache_memory=2**28))
        prompt = [100] * args.context
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm
        engine.add_request("d", prompt, SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True))
        engine.step()  # prefill
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        result["gptserve_ms"] = (time.perf_counter() - t) / args.steps * 1e3
        del engine

        step = decode_step_fn(sd, n_layer, n_head, max_len)
        with torch.inference_mode():
            result["eager_ms"], eager_tokens = time_steps(step, n_layer, n_head, C, max_len, args.context, args.steps)
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        inductor_config.cpp_wrapper = True
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            t = time.perf_counter()
            time_steps(compiled, n_layer, n_head, C, max_len, 0, 1)  # compile
            result["inductor_compile_s"] = time.perf_counter() - t
            result["inductor_ms"], compiled_tokens = time_steps(compiled, n_layer, n_head, C, max_len,
                                                                args.context, args.steps)
        result["inductor_tokens_equal_eager"] = compiled_tokens == eager_tokens
    result["inductor_vs_gptserve"] = result["inductor_ms"] / result["gptserve_ms"]
    print(f"{args.shape}, float32, batch 1, {result['threads']} threads, gptserve kernels {result['kernels']}")
    print(f"  gptserve step (C++ DecodeStack): {result['gptserve_ms']:.2f} ms")
    print(f"  eager PyTorch step:              {result['eager_ms']:.2f} ms")
    print(f"  Inductor (freezing, C++ wrapper): {result['inductor_ms']:.2f} ms "
          f"(compiled in {result['inductor_compile_s']:.0f} s; greedy tokens equal eager's: "
          f"{result['inductor_tokens_equal_eager']}); {result['inductor_vs_gptserve']:.2f}x gptserve's time")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
