"""An engine's start-up: everything LLMEngine's step loop needs, built once.

In order: the device (bound first, so this thread's CUDA work lands on it) and precision;
the model and tokenizer, loaded; the KV pool, sized from what is left of the memory; the
block manager, scheduler, sampler and model runner over it; the CPU kernels built (or
their cached build loaded) now rather than mid-request, and the linear layers held once in
their precision as the kernels' panels; the grammar compiler; and, when asked for, the
speculator with its proposer (a draft model has a KV pool of its own).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gptserve.config import EngineConfig
from gptserve.engine.block_manager import BlockManager
from gptserve.engine.grammar import GrammarCompiler
from gptserve.engine.limits import EngineLimits
from gptserve.engine.lora import AdapterTable
from gptserve.engine.outputs import AdapterError
from gptserve.engine.model_runner import ModelRunner
from gptserve.engine.placement import (Precision, bind_device, kv_cache_bytes, profile_gpu_memory, resolve_device,
                                      resolve_precision)
from gptserve.engine.proposers import build_proposer
from gptserve.engine.sampler import Sampler
from gptserve.engine.scheduler import Scheduler
from gptserve.engine.speculative import Speculator
from gptserve.model.attention import KVPool
from gptserve.model.cpu_kernels import cpu_kernel_variant, paged_decode
from gptserve.model.gpt2 import GPT2
from gptserve.model.lora import LoRAStack
from gptserve.model.panel_linear import cpu_weight_format, panels_for_cpu
from gptserve.model.tokenizer import Tokenizer
from gptserve.weights.loader import load_model, release_freed_memory, resolve_model_path

log = logging.getLogger(__name__)


@dataclass
class EngineParts:
    device: torch.device
    precision: Precision
    model: GPT2
    tokenizer: Tokenizer
    pool: KVPool
    limits: EngineLimits
    block_manager: BlockManager
    scheduler: Scheduler
    runner: ModelRunner
    grammars: GrammarCompiler
    speculator: Speculator | None
    panels: bool  # linear layers held in panels for the CPU kernels
    adapters: AdapterTable | None  # LoRA adapters, when enabled


def build_parts(model: str | None, config: EngineConfig, loaded: tuple[GPT2, Tokenizer] | None = None
                ) -> EngineParts:
    """`model`: a folder or Hub id (None: the bundled model); `loaded`: a model and tokenizer
    already in memory, used instead."""
    device = resolve_device(config.device)
    bind_device(device)  # this thread's CUDA work (load, graphs, Triton) goes to our GPU: bind first
    precision = resolve_precision(config.dtype, config.quantization, device)
    dtype = precision.compute
    if loaded is None:
        path = resolve_model_path(model)
        tokenizer = Tokenizer.from_folder(path)  # first: a bad tokenizer fails before the long load
        # on the CPU the weights go into panels as they load (one float32 layer at a time)
        weights = cpu_weight_format(precision.weights) if device.type == "cpu" else None
        gpt2 = load_model(path, device, dtype, weights)
    else:
        gpt2, tokenizer = loaded
    mc = gpt2.config
    max_model_len = min(config.max_model_len or mc.n_positions, mc.n_positions)
    weights_bytes = sum(p.numel() * p.element_size() for p in gpt2.parameters())
    per_block = KVPool.bytes_per_block(mc.n_layer, config.block_size, mc.n_head, mc.head_dim, dtype)
    budget = kv_cache_bytes(device, config.kv_cache_memory, config.gpu_memory_utilization,
                            weights_bytes, profile_gpu_memory(gpt2, config, max_model_len))
    num_blocks = max(1, budget // per_block - 1)  # one more block is the pool's scratch block
    pool = KVPool(mc.n_layer, num_blocks, config.block_size, mc.n_head, mc.head_dim, dtype, device)
    # a model's vocabulary may be padded past the tokenizer's: no token names those rows
    vocab_size = min(mc.vocab_size, tokenizer.vocab_size)
    limits = EngineLimits(max_model_len, vocab_size, num_blocks * config.block_size)
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    adapters = _adapters(mc, config, device)
    scheduler = Scheduler(block_manager, config.max_num_seqs, config.max_num_batched_tokens, adapters)
    graph_sizes = () if config.enforce_eager else tuple(
        b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs)
    panels = _prepare_weights(gpt2, device, precision)
    runner = ModelRunner(gpt2, pool, Sampler(vocab_size, device, config.seed), max_model_len, graph_sizes,
                         None if adapters is None else adapters.stack)
    speculator = None
    if config.speculative is not None:
        proposer = build_proposer(config.speculative, mc, vocab_size, device, dtype, num_blocks,
                                  config.block_size, max_model_len)
        speculator = Speculator(config.speculative, proposer, limits, block_manager)
    log.info("engine ready: %s on %s (%s%s), %d KV blocks of %d tokens (%.0f MiB), max_model_len %d",
             model or "default model", device, precision, f", {cpu_kernel_variant()} panel kernels" if panels else "",
             num_blocks, config.block_size, num_blocks * per_block / 2**20, max_model_len)
    return EngineParts(device, precision, gpt2, tokenizer, pool, limits, block_manager, scheduler, runner,
                       GrammarCompiler(tokenizer, vocab_size), speculator, panels, adapters)


def _adapters(mc, config: EngineConfig, device: torch.device) -> AdapterTable | None:
    """The LoRA slots and the adapters named at start, when adapters are enabled."""
    if not config.lora_enabled:
        return None
    if config.max_loras < 1 or config.max_lora_rank < 1:
        raise AdapterError("--max-loras and --max-lora-rank must be at least 1")
    stack = LoRAStack(mc, config.max_loras, config.max_lora_rank, device)
    table = AdapterTable(stack, mc)
    for name, path in config.lora_modules.items():
        table.add(name, path)
    log.info("LoRA: %d slots of rank up to %d (%.0f MiB); adapters: %s", config.max_loras, config.max_lora_rank,
             stack.nbytes() / 2**20, ", ".join(config.lora_modules) or "none yet")
    return table


def _prepare_weights(model: GPT2, device: torch.device, precision: Precision) -> bool:
    """Ready the CPU's fast paths; whether the linear layers went into the kernels' panels."""
    if device.type != "cpu":
        return False
    paged_decode()  # build (or load the cached build of) the CPU kernels now, not mid-request
    panels = panels_for_cpu(model, precision.weights)  # one copy of the weights, in their precision
    release_freed_memory()  # the float32 weights just dropped
    return panels
