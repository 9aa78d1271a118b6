"""Decode steps as captured CUDA graphs, one per padded batch size.

A decode step is many small kernels; on a GPU the launch overhead dominates at small
batches. Each graph reads static input buffers (ids, positions, slots, block tables,
context lengths), so a step copies its inputs in and replays. Padding rows write their
K/V to a scratch block that no sequence owns and attend to one token of it. Attention in
the graph is the Triton paged kernel (model/triton_attention.py): it reads each row's own
blocks up to that row's length, so padding the block tables to max_model_len costs nothing.
Graphs are captured on a side stream of the model's GPU, on a thread bound to it.
With capture=False the same static buffers and padding run eagerly: that is how the
device-independent part is tested on a machine without a GPU.
"""
from __future__ import annotations

import bisect
import logging

import torch

from gptserve.model.attention import KVPool, PagedAttention, PagedMetadata
from gptserve.model.gpt2 import GPT2

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: GPT2, pool: KVPool, max_blocks: int, batch_sizes: tuple[int, ...],
                 capture: bool = True):
        self.model = model
        self.pool = pool
        self.max_blocks = max_blocks
        self.sizes = sorted(batch_sizes)
        dev = model.device
        n = self.sizes[-1]
        self.scratch_slot = pool.scratch_block * pool.block_size
        self.inputs = {
            "input_ids": torch.zeros(n, dtype=torch.long, device=dev),
            "positions": torch.zeros(n, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev),
            "block_tables": torch.full((n, max_blocks), pool.scratch_block, dtype=torch.long, device=dev),
            "context_lens": torch.ones(n, dtype=torch.long, device=dev),
        }
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def fits(self, batch_size: int, with_lora: bool = False) -> bool:
        """Whether a decode step of this size replays a graph (captured without LoRA adapters)."""
        return batch_size <= self.sizes[-1] and not with_lora

    def _forward(self, b: int) -> torch.Tensor:
        x = self.inputs
        meta = PagedMetadata(slot_mapping=x["slot_mapping"][:b], num_decode=b,
                             decode_block_tables=x["block_tables"][:b],
                             decode_context_lens=x["context_lens"][:b], decode_max_blocks=self.max_blocks)
        return self.model(x["input_ids"][:b], x["positions"][:b], PagedAttention(self.pool, meta))

    @torch.inference_mode()
    def _capture(self) -> None:
        dev = self.model.device
        # a side stream of the model's own GPU: torch.cuda.graph's default stream belongs to
        # the thread's current device, which for cuda:1 would be another GPU's
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # the pool and weights are ready
        pool_handle = None
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels (Triton compiles here) and allocator outside the capture
                    self._forward(b)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool_handle, stream=stream):
                self.outputs[b] = self._forward(b)
            pool_handle = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs on %s for batch sizes %s", dev, self.sizes)

    def run(self, inputs: dict[str, torch.Tensor], lora=None) -> torch.Tensor:  # lora: None (see fits)
        b = inputs["input_ids"].shape[0]
        padded = self.sizes[bisect.bisect_left(self.sizes, b)]
        x = self.inputs
        x["slot_mapping"].fill_(self.scratch_slot)
        x["block_tables"].fill_(self.pool.scratch_block)
        x["context_lens"].fill_(1)
        for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
            x[name][:b].copy_(inputs[name], non_blocking=True)
        tables = inputs["block_tables"]
        x["block_tables"][:b, :tables.shape[1]].copy_(tables, non_blocking=True)
        if self.graphs:
            self.graphs[padded].replay()
        else:
            self.outputs[padded] = self._forward(padded)
        return self.outputs[padded][:b]
