"""A CPU decode step in one compiled call.

At a few rows a decode step's matmuls read every weight once and take a few milliseconds;
driven from Python, each layer's other ~25 operations (layer norms, views, the K/V write,
attention, GELU, residual adds) cost several milliseconds more in dispatch alone. `CpuDecode`
hands the model's weights once to the compiled `DecodeStack` (csrc/cpu_kernels.cpp), which
runs a decode-only step, embeddings to final layer norm, in one call from Python, with the
GIL released. It runs the same ATen operations and the same kernels the Python path does,
so a decode row's hidden state is the same bits on either path (tested); the engine uses it
for every decode-only step on the CPU (ModelRunner), and the Python path for steps with
prompt chunks or speculative verifies.

It applies where every linear layer and the tied LM head are held in panels
(panel_linear.py) and the compute is float32; `CpuDecode.build` returns None elsewhere. With
LoRA adapters on, it holds the model's adapter slots too (model/lora.py) and adds each row's
update with the same kernel (`lora_add`) as the Python path.
"""
from __future__ import annotations

import torch

from gptserve.model.attention import KVPool
from gptserve.model.cpu_kernels import panel_kernels
from gptserve.model.gpt2 import GPT2
from gptserve.model.lora import TARGETS, LoRABatch, LoRAStack
from gptserve.model.panel_linear import PanelLinear


def _weight(layer: PanelLinear) -> list[torch.Tensor | None]:
    return [layer.panels, layer.scale, layer.bias]


class CpuDecode:
    def __init__(self, stack, pool: KVPool):
        self.stack = stack
        self.pool = pool

    @classmethod
    def build(cls, model: GPT2, pool: KVPool, lora: LoRAStack | None = None) -> CpuDecode | None:
        kernels = panel_kernels()
        head = model.lm_head
        if kernels is None or model.device.type != "cpu" or pool.kv.dtype != torch.float32:
            return None
        if not isinstance(head, PanelLinear) or not all(isinstance(m, PanelLinear) for block in model.h
                                                        for m in (block.attn.c_attn, block.attn.c_proj,
                                                                  block.mlp.c_fc, block.mlp.c_proj)):
            return None
        cfg = model.config
        stack = kernels.DecodeStack(head.panels, head.scale, head.out_features, model.wpe.weight.detach(),
                                    model.ln_f.weight.detach(), model.ln_f.bias.detach(), cfg.n_head,
                                    cfg.layer_norm_epsilon)
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            stack.add_layer(block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_2.weight.detach(),
                            block.ln_2.bias.detach(), _weight(attn.c_attn), _weight(attn.c_proj),
                            _weight(mlp.c_fc), _weight(mlp.c_proj),
                            [m.out_features for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)], attn.scale)
        for i, targets in enumerate(lora.layers if lora is not None else []):
            stack.set_lora(i, [[targets[t].a, targets[t].b, targets[t].ranks] for t in TARGETS])
        return cls(stack, pool)

    def fits(self, batch_size: int, with_lora: bool = False) -> bool:
        return batch_size > 0

    def run(self, inputs: dict[str, torch.Tensor], lora: LoRABatch | None = None) -> torch.Tensor:
        """The final hidden states (B, C) of a decode-only step, K/V written to the pool;
        `inputs` as ModelRunner._decode_inputs makes them; `lora`: the rows' adapter slots."""
        return self.stack.forward(inputs["input_ids"], inputs["positions"], self.pool.kv, inputs["slot_mapping"],
                                  inputs["block_tables"], inputs["context_lens"],
                                  None if lora is None else lora.slots)
