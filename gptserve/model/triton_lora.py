"""LoRA's per-row low-rank update on the GPU, in Triton (Punica's BGMV: batched gather
matrix-vector): y[n] += B_s (A_s x[n]) for each row n with an adapter slot s = slots[n]
(-1: none), the slots' weights stacked as model/lora.py holds them, a (S, K, R) and
b (S, R, O), float32, whatever the activations' dtype (the sums are float32 too).

Two kernels, one program per row (and per block of outputs): `shrink` makes h = A_s x[n]
(R values), `expand` adds B_s h to y[n]. Every row is computed alone, so a row's result
does not depend on its batch, and a step that mixes adapters is one launch of each.
Importing this module needs triton; model/lora.py imports it lazily, on a GPU. Tests run
it on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # input features summed per loop step
BLOCK_O = 128  # outputs per program


@triton.jit
def _shrink(x_ptr, a_ptr, slots_ptr, h_ptr, K, R, stride_xn, stride_as, stride_ak, stride_hn,
            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    n = tl.program_id(0)
    s = tl.load(slots_ptr + n)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], tl.float32)
    if s >= 0:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_ptr + n * stride_xn + k, mask=k_ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + s * stride_as + k[:, None] * stride_ak + r[None, :],
                        mask=k_ok[:, None] & (r[None, :] < R), other=0.0)  # (BLOCK_K, BLOCK_R)
            acc += tl.sum(x[:, None] * a, axis=0)
    tl.store(h_ptr + n * stride_hn + r, acc, mask=r < R)


@triton.jit
def _expand(h_ptr, b_ptr, slots_ptr, y_ptr, R, O, stride_hn, stride_bs, stride_br, stride_yn,
            BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    n = tl.program_id(0)
    s = tl.load(slots_ptr + n)
    if s >= 0:
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = o < O
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        h = tl.load(h_ptr + n * stride_hn + r, mask=r_ok, other=0.0)
        b = tl.load(b_ptr + s * stride_bs + r[:, None] * stride_br + o[None, :],
                    mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_O)
        update = tl.sum(h[:, None] * b, axis=0)
        y = tl.load(y_ptr + n * stride_yn + o, mask=o_ok, other=0.0)
        tl.store(y_ptr + n * stride_yn + o, (y.to(tl.float32) + update).to(y.dtype), mask=o_ok)


def lora_add(x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """y (N, O) += each row's update, in place; x (N, K); slots (N,) int64; a (S, K, R), b (S, R, O)."""
    n, k = x.shape
    r, o = a.shape[2], y.shape[1]
    if n == 0:
        return
    x, y_ = x.contiguous(), y if y.is_contiguous() else y.contiguous()
    h = torch.empty(n, r, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(r)
    _shrink[(n,)](x, a, slots, h, k, r, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
                  BLOCK_K=BLOCK_K, BLOCK_R=block_r)
    _expand[(n, triton.cdiv(o, BLOCK_O))](h, b, slots, y_, r, o, h.stride(0), b.stride(0), b.stride(1),
                                          y_.stride(0), BLOCK_R=block_r, BLOCK_O=BLOCK_O)
    if y_ is not y:
        y.copy_(y_)
