"""Device, dtype and KV-pool sizing decisions."""
from __future__ import annotations

import pytest
import torch

from gptserve.config import parse_bytes
from gptserve.engine.placement import (GpuMemory, Precision, PlacementError, gpu_kv_budget, kv_cache_bytes,
                                       profile_gpu_memory, resolve_device, resolve_dtype,
                                       resolve_precision, warm_up)


def test_auto_is_float32_on_the_cpu_and_names_are_understood():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("fp16", cpu) is torch.float16
    with pytest.raises(PlacementError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


def test_on_the_cpu_16_bit_dtypes_and_int8_change_only_how_weights_are_held():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", None, cpu) == Precision(torch.float32, "float32")
    assert resolve_precision("bfloat16", None, cpu) == Precision(torch.float32, "bfloat16")
    assert resolve_precision("fp16", None, cpu) == Precision(torch.float32, "float16")
    assert resolve_precision("auto", "int8", cpu) == Precision(torch.float32, "int8")
    assert str(resolve_precision("float32", "int8", cpu)) == "int8 weights, float32 compute"
    with pytest.raises(PlacementError, match="drop --dtype bfloat16"):
        resolve_precision("bfloat16", "int8", cpu)
    with pytest.raises(PlacementError, match="unknown quantization 'int4'"):
        resolve_precision("auto", "int4", cpu)
    with pytest.raises(PlacementError, match="CPU only"):
        resolve_precision("float16", "int8", torch.device("meta"))


def test_auto_on_the_cpu_is_bfloat16_weights_where_the_kernel_runs_else_float32(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", None, cpu) == Precision(torch.float32, "bfloat16")
    monkeypatch.setattr("gptserve.engine.placement.panel_kernels", lambda: None)
    assert resolve_precision("auto", None, cpu) == Precision(torch.float32, "float32")


def test_devices_are_checked_before_use():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PlacementError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(PlacementError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_auto_falls_back_and_cuda_is_refused():
    assert resolve_device("auto").type in ("cpu", "mps")
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(PlacementError, match="no CUDA GPU"):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_with_cuda_auto_and_cuda_name_the_first_gpu_and_a_missing_index_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")  # an explicit index, not a bare "cuda"
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(PlacementError, match=rf"cuda:{count}: only {count} CUDA GPU\(s\) present"):
        resolve_device(f"cuda:{count}")
    cuda = torch.device("cuda:0")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", cuda) is expected
    assert kv_cache_bytes(cuda, 12345, 0.9, 10**9) == 12345
    with pytest.raises(PlacementError, match="no GPU memory left"):
        kv_cache_bytes(cuda, None, 0.0, 10**9)


def test_sizes_read_as_people_write_them():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="cannot read 'lots' as a size"):
        parse_bytes("lots")


def test_the_kv_budget_is_as_asked_or_a_cpu_default():
    cpu = torch.device("cpu")
    assert kv_cache_bytes(cpu, 12345, 0.9, 10**9) == 12345
    assert kv_cache_bytes(cpu, None, 0.9, 10**9) == 2 * 2**30


def test_engine_pool_has_the_blocks_the_budget_buys(tiny_checkpoint):
    from gptserve.config import EngineConfig
    from gptserve.engine.llm_engine import LLMEngine

    # tiny model: 2 layers x (K, V) x 16 tokens x 64 dims x 4 bytes = 16 KiB a block
    engine = LLMEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=101 * 16 * 1024, block_size=16))
    assert engine.block_manager.num_blocks == 100  # one more is the pool's scratch block
    assert engine.pool.kv.shape == (2, 2, 101, 16, 4, 16)
    assert engine.pool.kv.dtype is torch.float32 and engine.pool.kv.device.type == "cpu"


GIB = 2**30


def test_on_a_gpu_the_kv_pool_gets_what_remains_under_the_utilization_after_the_profiled_peak():
    # an 80 GiB card; this process's peak 10 GiB (weights and the largest step), 11 GiB held by
    # its allocator now; 3 GiB in use outside PyTorch (CUDA context, another process)
    mem = GpuMemory(total=80 * GIB, free=66 * GIB, reserved=11 * GIB, peak=10 * GIB)
    assert gpu_kv_budget(mem, 0.9) == int(72 * GIB) - 10 * GIB - 3 * GIB
    assert kv_cache_bytes(torch.device("cuda:1"), None, 0.9, 6 * GIB, profiled=mem) == int(72 * GIB) - 13 * GIB
    assert kv_cache_bytes(torch.device("cuda:1"), 12345, 0.9, 6 * GIB, profiled=mem) == 12345  # as asked


def test_a_peak_that_leaves_nothing_for_the_kv_pool_is_refused_with_the_figures():
    mem = GpuMemory(total=16 * GIB, free=4 * GIB, reserved=10 * GIB, peak=9 * GIB)
    with pytest.raises(PlacementError, match=r"0\.50 of 16\.0 GiB, less a peak of 9\.00 GiB .* 2\.00 GiB outside"):
        gpu_kv_budget(mem, 0.5)


def test_the_profiling_step_runs_the_largest_batch_the_configuration_allows(tiny_checkpoint):
    """The warm-up forward itself is device-independent: here on the CPU, at a token budget
    that spans several whole contexts and a part of one."""
    from gptserve.weights.loader import load_model

    model = load_model(tiny_checkpoint, torch.device("cpu"), torch.float32)  # n_positions 256
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    warm_up(model, num_tokens=600, num_rows=64, max_model_len=256)
    assert calls == [torch.Size([600, 64])]


def test_nothing_is_profiled_off_a_gpu_or_when_the_pool_size_is_given(tiny_checkpoint):
    from gptserve.config import EngineConfig
    from gptserve.weights.loader import load_model

    model = load_model(tiny_checkpoint, torch.device("cpu"), torch.float32)
    assert profile_gpu_memory(model, EngineConfig(), 256) is None
    assert profile_gpu_memory(model, EngineConfig(kv_cache_memory=2**20), 256) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_profiled_peak_holds_the_weights_and_more(tiny_checkpoint):
    from gptserve.config import EngineConfig
    from gptserve.weights.loader import load_model

    model = load_model(tiny_checkpoint, torch.device("cuda:0"), torch.float16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    mem = profile_gpu_memory(model, EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64), 256)
    assert mem.peak > weights and 0 < mem.free < mem.total and mem.reserved >= weights
    assert 0 < gpu_kv_budget(mem, 0.9) < mem.total
