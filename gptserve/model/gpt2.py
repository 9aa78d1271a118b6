"""The GPT-2 decoder: embeddings, pre-LayerNorm blocks, tied LM head.

Parameter names are the Hugging Face checkpoint's own (`wte`, `h.N.attn.c_attn`, ...),
stored as nn.Linear (out, in), so loading is the checkpoint's Conv1D (in, out) transposed.

The model runs on a flat batch of tokens, (N, C), from any number of sequences; how
those tokens see each other and the past is the attention backend's business
(gptserve.model.attention), passed in explicitly on every call; so are the rows' LoRA
adapters, when any row has one (gptserve.model.lora).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptserve.config import ModelConfig
from gptserve.model.lora import LoRABatch


class AttentionBackend(Protocol):
    """Attends the step's queries to the keys/values of their own sequences, past included."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:  # q, k, v: (N, H, D) -> (N, H, D)
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        self.scale = scale

    def forward(self, x: torch.Tensor, attn: AttentionBackend, lora: LoRABatch | None = None) -> torch.Tensor:
        n = x.shape[0]  # x: (N, C)
        qkv = self.c_attn(x)  # (N, 3C)
        if lora is not None:
            lora.add(self.layer, "attn.c_attn", x, qkv)
        q, k, v = qkv.view(n, 3, self.n_head, self.head_dim).unbind(1)  # (N, H, D) each
        y = attn(self.layer, q, k, v, self.scale).reshape(n, -1)  # (N, C)
        out = self.c_proj(y)
        return out if lora is None else lora.add(self.layer, "attn.c_proj", y, out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_dim)
        self.c_proj = nn.Linear(cfg.mlp_dim, cfg.n_embd)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if lora is None:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new
        h = F.gelu(lora.add(self.layer, "mlp.c_fc", x, self.c_fc(x)), approximate="tanh")
        return lora.add(self.layer, "mlp.c_proj", h, self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: torch.Tensor, attn: AttentionBackend, lora: LoRABatch | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn, lora)
        return x + self.mlp(self.ln_2(x), lora)


class GPT2(nn.Module):
    """GPT-2 over a flat batch: forward() gives hidden states, logits() the LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        # None: the head is tied to wte. On the CPU the head is a PanelLinear of wte's weights
        # and wte reads its rows from it (gptserve.model.panel_linear)
        self.lm_head: nn.Module | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (N, C)
        for block in self.h:
            x = block(x, attn, lora)
        return self.ln_f(x)  # (N, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return hidden @ self.wte.weight.t()  # tied LM head: (N, C) @ (C, V) -> (N, V)

    @property
    def device(self) -> torch.device:
        return self.wpe.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wpe.weight.dtype
