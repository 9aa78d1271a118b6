"""Linear layers on the CPU with their weights held once, in panels, in 32, 16 or 8 bits.

A CPU decode step at low concurrency reads every weight once to make a few rows of
output: its time is the weights' bytes over the memory's bandwidth. Held in bfloat16 or
float16 the weights are half the bytes of float32; as int8, with one float32 scale per
output channel (symmetric, absmax / 127, quantized at load from the float checkpoint), a
quarter. Activations, layer norms, attention and the KV cache stay float32, and the math
is float32: the error is the rounding of the weights alone.

`panels_for_cpu(model, fmt)` swaps every nn.Linear for a PanelLinear holding its weight in
`fmt` (float32 included) as panels of 16 output channels, (P, K, 16), the layout the
compiled kernel (cpu_kernels.panel_linear) reads for any number of rows: up to four it
widens each weight in registers as it streams them; more, it widens one panel at a time
into a float32 buffer the size of a core's L2 and multiplies all rows by it. Each output is
summed in the same order on both paths, so a row's result does not depend on its batch.
That one copy is all there is: no float32 copy for large batches, no second layout.

The LM head is tied to the token embedding: it becomes a PanelLinear of `wte` in `fmt`, and
the embedding lookup reads its rows back from that head's panels (`PanelEmbedding`), so the
float32 table is freed. In 16 or 8 bits that rounds the input embeddings as it rounds the
head (llama.cpp's quantized token embeddings do the same).

Where the kernels can't be built (or GPTSERVE_NO_KERNELS=1), float32 keeps nn.Linear, and
16- and 8-bit weights are widened a chunk at a time for every matmul (slow, but right).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from gptserve.model.cpu_kernels import PANEL, panel_kernels

log = logging.getLogger(__name__)

WEIGHT_FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "int8": torch.int8}
CHUNK = 4096  # output channels at a time: quantized, put into panels, widened without the kernels


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q, scale) with weight ~= q * scale[:, None]. A
    chunk of rows at a time, so a large weight (the embedding) needs no full-size temporaries."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for o in range(0, weight.shape[0], CHUNK):
        w = weight[o:o + CHUNK].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q[o:o + CHUNK] = torch.round(w / s[:, None]).clamp(-127, 127)
        scale[o:o + CHUNK] = s
    return q, scale


def to_panels(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, K) -> (ceil(N / 16), K, 16) in `dtype` (default: the weight's): 16 output channels
    side by side, zero-padded. Written a chunk of rows at a time (no full-size temporary)."""
    n, k = weight.shape
    out = torch.zeros(-(-n // PANEL), k, PANEL, dtype=dtype or weight.dtype, device=weight.device)
    for o in range(0, n, CHUNK):  # CHUNK is a multiple of PANEL
        rows = weight[o:o + CHUNK]
        whole = rows.shape[0] // PANEL
        block = out[o // PANEL:]
        block[:whole].copy_(rows[:whole * PANEL].reshape(whole, PANEL, k).transpose(1, 2))
        if rows.shape[0] % PANEL:
            block[whole, :, :rows.shape[0] % PANEL].copy_(rows[whole * PANEL:].T)
    return out


def from_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """to_panels undone: (P, K, 16) -> (n, K)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


class PanelLinear(nn.Module):
    """y = x @ W.T + b for float32 x (N, in), W held as `fmt` (see WEIGHT_FORMATS) in panels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str):
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}: use one of {', '.join(WEIGHT_FORMATS)}")
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        if fmt == "int8":
            q, scale = quantize_int8(weight)
        else:
            q, scale = weight.detach(), None
        self.register_buffer("panels", to_panels(q, WEIGHT_FORMATS[fmt]))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._kernels = panel_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None:
            return self._kernels.panel_linear(x, self.panels, self.scale, self.bias, self.out_features)
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        pieces = [x @ w.T for w in self._widened_chunks()]
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` (output channels) in float32: a tied embedding's lookup."""
        if self._kernels is not None:
            return self._kernels.panel_rows(self.panels, self.scale, ids.reshape(-1), self.out_features).view(
                *ids.shape, self.in_features)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.out_features):
            raise IndexError(f"ids out of range [0, {self.out_features})")
        col, lane = ids // PANEL, ids % PANEL
        w = self.panels[col, :, lane].float()  # (..., K)
        return w if self.scale is None else w * self.scale[ids].unsqueeze(-1)

    def _widened_chunks(self):
        for o in range(0, self.out_features, CHUNK):
            n = min(CHUNK, self.out_features - o)
            w = from_panels(self.panels[o // PANEL:(o + n + PANEL - 1) // PANEL], n).float()
            yield w if self.scale is None else w * self.scale[o:o + n, None]

    def widened_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, (out, in) float32 (for tests and error measurements)."""
        return torch.cat(list(self._widened_chunks()))

    def weight_bytes(self) -> int:
        """Bytes of the weights as held (panel padding, scales and bias included)."""
        return sum(t.numel() * t.element_size() for t in (self.panels, self.scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights={self.fmt}")


class PanelEmbedding(nn.Module):
    """A token embedding read from the tied LM head's panels: one copy serves both."""

    def __init__(self, head: PanelLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.head = [head]  # a list, so the head is not registered twice as a submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(ids)


def cpu_weight_format(fmt: str) -> str | None:
    """The format to hold a CPU model's weights in (for the loader, which converts as it
    loads), or None where nn.Linear stays: float32 without the kernels."""
    return None if fmt == "float32" and panel_kernels() is None else fmt


def panels_for_cpu(model: nn.Module, fmt: str) -> bool:
    """Every linear layer of `model`, and its tied LM head and embedding, held as `fmt` in
    panels; call once, after the float32 weights are loaded, which are freed. False (nothing
    changed) for float32 without the kernels, where nn.Linear is as good."""
    if cpu_weight_format(fmt) is None:
        return False
    if isinstance(model.wte, PanelEmbedding):  # done already (the loader converts as it loads)
        return True
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PanelLinear(child.weight, child.bias, fmt))
        model.lm_head = PanelLinear(model.wte.weight, None, fmt)
        model.wte = PanelEmbedding(model.lm_head)
    if panel_kernels() is None:
        log.warning("the CPU kernels are unavailable: %s weights are widened for every matmul (slow)", fmt)
    return True
