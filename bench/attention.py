"""Why the paged attention backend is built the way it is: the hot-path choices, timed.

For GPT-2 small's head shape (12 heads x 64) it times, on this machine:
- gathering a sequence's KV blocks: `pool[tables]` (advanced indexing) vs `index_select`;
- decode attention over a padded batch: SDPA with a boolean length mask, SDPA with an
  additive float mask, and plain matmul-softmax-matmul;
- prefill attention: SDPA on 3-D vs 4-D tensors (only 4-D reaches the fused kernel), `is_causal`
  vs an explicit causal mask.

    python bench/attention.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timeit(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best * 1e6  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    h, d, bs = 12, 64, 16
    pool = torch.zeros(4096, bs, h, d)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in microseconds\n")
    print("| gather of KV blocks | blocks | pool[tables] | index_select |")
    print("|---|---|---|---|")
    for nblocks in (4, 32, 256):
        tables = torch.randint(0, 4096, (nblocks,))
        a = timeit(lambda: pool[tables], args.repeats)
        b = timeit(lambda: pool.index_select(0, tables), args.repeats)
        print(f"| one sequence's blocks | {nblocks} | {a:.0f} | {b:.0f} |")
    print("\n| decode attention | batch x context | SDPA bool mask | SDPA float mask | matmul-softmax |")
    print("|---|---|---|---|---|")
    for b, s in ((1, 128), (16, 512), (64, 512)):
        q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
        lens = torch.randint(1, s + 1, (b,))
        mask = (torch.arange(s)[None, :] < lens[:, None])[:, None, None, :]
        fmask = torch.zeros(b, 1, 1, s).masked_fill(~mask, float("-inf"))
        t1 = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats)
        t2 = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fmask), args.repeats)
        t3 = timeit(lambda: ((q @ k.transpose(-1, -2)) * d**-0.5 + fmask).softmax(-1) @ v, args.repeats)
        print(f"| decode | {b} x {s} | {t1:.0f} | {t2:.0f} | {t3:.0f} |")
    # 3-D (H, T, D) has no fused kernel and runs SDPA's math fallback; 4-D (1, H, T, D) runs
    # the fused one. "past": the chunk follows that many cached tokens (an explicit mask).
    print("\n| prefill attention | tokens + past | SDPA 3-D is_causal | 4-D is_causal | 3-D mask | 4-D mask |")
    print("|---|---|---|---|---|---|")
    for t, past in ((128, 0), (512, 0), (1000, 0), (512, 512)):
        q = torch.randn(t, h, d).transpose(0, 1)  # as the model hands it: (T, H, D) viewed as (H, T, D)
        k, v = (torch.randn(t + past, h, d).transpose(0, 1) for _ in range(2))
        mask = torch.ones(t, t + past, dtype=torch.bool).tril(diagonal=past)
        sdpa = F.scaled_dot_product_attention
        causal = ("-", "-") if past else (
            timeit(lambda: sdpa(q, k, v, is_causal=True), args.repeats),
            timeit(lambda: sdpa(q[None], k[None], v[None], is_causal=True), args.repeats))
        t3 = timeit(lambda: sdpa(q, k, v, attn_mask=mask), args.repeats)
        t4 = timeit(lambda: sdpa(q[None], k[None], v[None], attn_mask=mask), args.repeats)
        cells = " | ".join(c if isinstance(c, str) else f"{c:.0f}" for c in causal)
        print(f"| prefill | {t} + {past} | {cells} | {t3:.0f} | {t4:.0f} |")


if __name__ == "__main__":
    main()
