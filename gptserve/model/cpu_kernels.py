"""CPU kernels, compiled on first use: paged decode attention, and the greedy argmax.

Decode attention on the CPU is bound by memory traffic: each new token reads its
sequence's whole K/V. Done with PyTorch ops it must first gather the sequence's blocks
into one tensor (index_select), which reads and writes all of it once more before
attention reads it again: at 64 sequences of ~400 tokens that gather was 60% of a GPT-2
small step. This kernel reads K/V straight from the pool through the block table, once.

Greedy sampling takes each row's argmax over the vocabulary; torch.argmax scans a row
one element at a time (3.3 ms for 64 x 50,257 logits here, ~1.5% of that decode step),
where a max pass the compiler vectorises, then a search for its first index, takes a
fraction of that. Same answer as torch.argmax, NaN rows included.

They are built with torch.utils.cpp_extension (a C++ compiler and ninja are needed; the
build is cached per machine). Where they can't be built, or GPTSERVE_NO_KERNELS=1 is set,
`paged_decode()` and `row_argmax()` are None and the PyTorch path is used. float32 only.
Both release the GIL while they run, so other Python threads (the server's event loop)
keep going meanwhile.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q (B, H, D); k_cache, v_cache (N, bs, H, D); block_tables (B, M) int64; context_lens (B,) int64
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the pool must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), M = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lens[b];
      const float* qv = qp + i * D;
      scores.resize(n);
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = tables[b * M + t / bs] * bs + t % bs;
        const float* kv = kp + (slot * H + h) * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qv[d] * kv[d];
        scores[t] = s * fscale;
        mx = std::max(mx, scores[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) { scores[t] = std::exp(scores[t] - mx); sum += scores[t]; }
      float* o = op + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = tables[b * M + t / bs] * bs + t % bs;
        const float* vv = vp + (slot * H + h) * D;
        const float p = scores[t] / sum;
        for (int64_t d = 0; d < D; ++d) o[d] += p * vv[d];
      }
    }
  });
  return out;
}

// logits (B, V) float32 -> (B,) int64: each row's first index of its maximum, as
// torch.argmax (a NaN counts as the maximum, so the first NaN wins)
torch::Tensor row_argmax(torch::Tensor logits) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2, "(B, V) float32 only");
  logits = logits.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = torch::empty({B}, torch::kLong);
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = lp + b * V;
      constexpr int W = 16;  // independent lanes, so the loop vectorises without -ffast-math
      float lane[W];
      bool nan[W];
      for (int j = 0; j < W; ++j) { lane[j] = -INFINITY; nan[j] = false; }
      int64_t i = 0;
      for (; i + W <= V; i += W) {
        for (int j = 0; j < W; ++j) {
          const float x = row[i + j];
          lane[j] = x > lane[j] ? x : lane[j];
          nan[j] |= x != x;
        }
      }
      float mx = -INFINITY;
      bool any_nan = false;
      for (int j = 0; j < W; ++j) { mx = lane[j] > mx ? lane[j] : mx; any_nan |= nan[j]; }
      for (; i < V; ++i) { mx = row[i] > mx ? row[i] : mx; any_nan |= row[i] != row[i]; }
      int64_t at = 0;
      for (int64_t k = 0; k < V; ++k) {
        if (any_nan ? row[k] != row[k] : row[k] == mx) { at = k; break; }
      }
      op[b] = at;
    }
  });
  return out;
}

// The GIL is released while a kernel runs: the event loop sends SSE chunks while a step's kernels run.
// wrap_pybind_function_no_gil is load_inline's own wrapper (torch's error and warning translation)
// plus a py::gil_scoped_release inside it, so errors are still turned into Python ones with the GIL held.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function_no_gil(paged_decode), "paged_decode");
  m.def("row_argmax", torch::wrap_pybind_function_no_gil(row_argmax), "row_argmax");
}
"""

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                       torch.Tensor]
RowArgmax = Callable[[torch.Tensor], torch.Tensor]


def kernels_enabled() -> bool:
    """False when GPTSERVE_NO_KERNELS is set: no compiled kernels, no packed layers."""
    return os.environ.get("GPTSERVE_NO_KERNELS", "") in ("", "0")


def paged_decode() -> PagedDecode | None:
    """The compiled attention kernel, or None where it can't be had (then use the PyTorch path)."""
    module = _module()
    return None if module is None else module.paged_decode


def row_argmax() -> RowArgmax | None:
    """The compiled greedy argmax, or None where it can't be had (then use torch.argmax)."""
    module = _module()
    return None if module is None else module.row_argmax


@functools.cache
def _module():
    if not kernels_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        # v2: the bindings are in SOURCE now (GIL released); a new name so an old cached build isn't loaded
        return load_inline(name="gptserve_cpu_kernels_v2", cpp_sources=[SOURCE],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja: the PyTorch path still works
        log.warning("CPU kernels unavailable (%s); using the PyTorch path", str(e)[:200])
        return None
