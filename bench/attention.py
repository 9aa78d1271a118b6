"""Why the paged attention backend is built the way it is: the hot-path choices, timed.

For GPT-2 small's head shape (12 heads x 64) it times, on this machine:
- gathering a sequence's KV blocks: `pool[tables]` (advanced indexing) vs `index_select`;
- decode attention over a padded batch: SDPA with a boolean length mask, SDPA with an
  additive float mask, and plain matmul-softmax-matmul;
- prefill attention: SDPA `is_causal` vs an explicit causal mask.

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
    print("\n| prefill attention | tokens | SDPA is_causal | SDPA explicit mask |")
    print("|---|---|---|---|")
    for t in (128, 512):
        q, k, v = (torch.randn(h, t, d) for _ in range(3))
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        t1 = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
        t2 = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.repeats)
        print(f"| prefill | {t} | {t1:.0f} | {t2:.0f} |")


if __name__ == "__main__":
    main()
