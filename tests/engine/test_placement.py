"""Device, dtype and KV-pool sizing decisions."""
from __future__ import annotations

import pytest
import torch

from gptserve.engine.placement import (Precision, PlacementError, kv_cache_bytes, parse_bytes, resolve_device,
                                       resolve_dtype, resolve_precision)


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
    monkeypatch.setattr("gptserve.engine.placement.few_rows_linear", lambda: None)
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
    with pytest.raises(PlacementError):
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
