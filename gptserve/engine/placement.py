"""Where the weights and the KV pool live, in what dtype, and how big the pool is (on a GPU:
what remains after a profiled warm-up step); binding a thread to its GPU."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from gptserve.config import EngineConfig, ModelConfig
from gptserve.model.attention import KVPool, PagedAttention, PagedMetadata, PrefillSpan
from gptserve.model.cpu_kernels import panel_kernels
from gptserve.model.gpt2 import GPT2
from gptserve.model.lora import LoRAStack
from gptserve.weights.loader import read_config, resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}
CPU_DEFAULT_KV_BYTES = 2 * 1024**3


class PlacementError(ValueError):
    pass


def resolve_device(device: str) -> torch.device:
    """auto: the first CUDA GPU, else Apple's MPS, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise PlacementError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"--device {device} asked for, but no CUDA GPU is available")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise PlacementError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) present")
        if dev.index is None:
            dev = torch.device("cuda:0")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PlacementError("--device mps asked for, but MPS is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, else float16; float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise PlacementError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Precision:
    """How a model computes and holds its weights. `compute`: activations, layer norms,
    attention and the KV cache; `weights`: the linear layers and the LM head."""

    compute: torch.dtype
    weights: str  # "float32", "bfloat16", "float16" or "int8"

    def __str__(self) -> str:
        name = str(self.compute).removeprefix("torch.")
        return name if self.weights == name else f"{self.weights} weights, {name} compute"


def resolve_precision(dtype: str, quantization: str | None, device: torch.device) -> Precision:
    """On the CPU, 16-bit dtypes and int8 quantization change only how the linear layers
    hold their weights (model/panel_linear.py): the math stays float32, which CPUs
    without 16-bit dot products do fastest. `auto` on the CPU is bfloat16 weights where
    the compiled kernels run: measured faster than float32 at every concurrency
    (1.7-1.9x at one to four streams, 1.07-1.13x at 16 and 64; BENCHMARKS.md) and within
    the tested bfloat16 tolerance; float32 where the kernel can't be had. Elsewhere the
    whole model runs in the dtype, and quantization is not offered."""
    if quantization not in (None, "int8"):
        raise PlacementError(f"unknown quantization {quantization!r}: use int8")
    compute = resolve_dtype(dtype, device)
    if device.type != "cpu":
        if quantization is not None:
            raise PlacementError(f"--quantization {quantization} runs on the CPU only")
        return Precision(compute, str(compute).removeprefix("torch."))
    if quantization == "int8":
        if compute != torch.float32:
            raise PlacementError("--quantization int8 holds int8 weights and computes in float32; "
                                 f"drop --dtype {dtype}")
        return Precision(torch.float32, "int8")
    if dtype == "auto":  # the kernel is compiled (or its cached build loaded) on first use
        return Precision(torch.float32, "bfloat16" if panel_kernels() is not None else "float32")
    return Precision(torch.float32, str(compute).removeprefix("torch."))


def held_bytes(cfg: ModelConfig, precision: Precision) -> int:
    """The model's weights as the engine holds them: the matrices (linear layers and the tied
    embedding, one copy) in the weights' format (int8 with a float32 scale per output channel),
    the rest (biases, layer norms, positions) in the compute dtype."""
    matrices = cfg.n_layer * (4 * cfg.n_embd + 2 * cfg.mlp_dim) * cfg.n_embd + cfg.vocab_size * cfg.n_embd
    channels = cfg.n_layer * (5 * cfg.n_embd + cfg.mlp_dim) + cfg.vocab_size
    compute = torch.empty((), dtype=precision.compute).element_size()
    if precision.weights == "int8":
        return matrices + 4 * channels + (cfg.num_parameters() - matrices) * compute
    weights = torch.empty((), dtype=getattr(torch, precision.weights)).element_size()
    return matrices * weights + (cfg.num_parameters() - matrices) * compute


def estimated_memory(model: str | None, config: EngineConfig) -> int:
    """Bytes an engine of `model` under `config` will hold, before it is built: its weights as
    held, its KV pool (as asked, or the CPU's default) and its LoRA slots; for a model
    registry's budget (an engine reports what it really holds once built)."""
    cfg = read_config(resolve_model_path(model))
    precision = resolve_precision(config.dtype, config.quantization, resolve_device(config.device))
    kv = config.kv_cache_memory if config.kv_cache_memory is not None else CPU_DEFAULT_KV_BYTES
    lora = LoRAStack.bytes_needed(cfg, config.max_loras, config.max_lora_rank) if config.lora_enabled else 0
    return held_bytes(cfg, precision) + kv + lora


def bind_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (a no-op elsewhere). Run it
    first on every thread or process that does an engine's CUDA work: streams, graph
    capture and Triton launches use the current device, which starts as cuda:0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


@dataclass(frozen=True)
class GpuMemory:
    """Memory readings of one GPU, in bytes, taken after the profiling step."""

    total: int  # the card's memory
    free: int  # free on the card now (all processes)
    reserved: int  # held now by this process's PyTorch allocator
    peak: int  # this process's peak allocated by PyTorch: weights plus the largest step's activations


def gpu_kv_budget(mem: GpuMemory, utilization: float) -> int:
    """The KV pool's share: `utilization` of the card, less the profiled peak and what lies
    outside PyTorch's allocator (the CUDA context, other processes)."""
    outside = mem.total - mem.free - mem.reserved
    budget = int(mem.total * utilization) - mem.peak - outside
    if budget <= 0:
        raise PlacementError(
            f"no GPU memory left for the KV cache: {utilization:.2f} of {mem.total / 2**30:.1f} GiB, less "
            f"a peak of {mem.peak / 2**30:.2f} GiB (weights and activations) and {outside / 2**30:.2f} GiB "
            "outside PyTorch; lower --max-num-batched-tokens or the model size, or raise "
            "--gpu-memory-utilization")
    return budget


@torch.inference_mode()
def warm_up(model: GPT2, num_tokens: int, num_rows: int, max_model_len: int) -> None:
    """The largest step the engine may run: `num_tokens` prompt tokens (as sequences of up to
    max_model_len, each attending within itself), then the LM head and a float32 softmax over
    `num_rows` rows, as the sampler does. K/V go to a one-block pool (its scratch block)."""
    cfg, dev = model.config, model.device
    pool = KVPool(cfg.n_layer, 0, 16, cfg.n_head, cfg.head_dim, model.dtype, dev)
    lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    positions = torch.cat([torch.arange(n) for n in lengths]).to(dev)
    spans, start = [], 0
    for n in lengths:
        spans.append(PrefillSpan(start, start + n, n, torch.zeros(1, dtype=torch.long, device=dev)))
        start += n
    slots = pool.scratch_block * pool.block_size + positions % pool.block_size
    meta = PagedMetadata(slot_mapping=slots, prefills=spans)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    hidden = model(ids, positions, PagedAttention(pool, meta))
    model.logits(hidden[-num_rows:]).float().softmax(-1)


def profile_gpu_memory(model: GPT2, config: EngineConfig, max_model_len: int) -> GpuMemory | None:
    """Run the largest step the configuration allows (warm_up) on the model's GPU and read
    the memory figures around it; None where nothing needs it (not CUDA, or the pool's size
    given)."""
    dev = model.device
    if dev.type != "cuda" or config.kv_cache_memory is not None:
        return None
    torch.cuda.reset_peak_memory_stats(dev)
    warm_up(model, config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    torch.cuda.empty_cache()  # the warm-up's activations go back; the peak is what counted
    free, total = torch.cuda.mem_get_info(dev)
    return GpuMemory(total, free, torch.cuda.memory_reserved(dev), peak)


def kv_cache_bytes(device: torch.device, requested: int | None, utilization: float,
                   weights_bytes: int, profiled: GpuMemory | None = None) -> int:
    """Bytes for the KV pool: as asked; on a GPU, what remains under `utilization` after the
    profiled peak (profile_gpu_memory); else a CPU default. Unprofiled on a GPU, the peak is
    taken as what is allocated now plus a quarter of the weights for activations."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        if profiled is None:
            free, total = torch.cuda.mem_get_info(device)
            profiled = GpuMemory(total, free, torch.cuda.memory_reserved(device),
                                 torch.cuda.memory_allocated(device) + weights_bytes // 4)
        budget = gpu_kv_budget(profiled, utilization)
        gib = 2**30
        log.info("KV cache on %s: %.2f GiB = %.2f of %.2f GiB, less a peak of %.2f GiB (%.2f GiB of weights)"
                 " and %.2f GiB outside PyTorch", device, budget / gib, utilization, profiled.total / gib,
                 profiled.peak / gib, weights_bytes / gib,
                 (profiled.total - profiled.free - profiled.reserved) / gib)
        return budget
    return CPU_DEFAULT_KV_BYTES
