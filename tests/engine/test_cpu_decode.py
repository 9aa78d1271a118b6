"""A CPU decode-only step runs in one compiled call (model/cpu_decode.py) and computes the
same bits the step computes op by op from Python: hidden states, K/V written to the pool,
and so the same greedy tokens."""
from __future__ import annotations

import pytest
import torch

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.scheduler import ScheduledBatch
from gptserve.model.cpu_decode import CpuDecode
from tests.engine.conftest import random_prompts

PRECISIONS = [("float32", None), ("bfloat16", None), ("float16", None), ("float32", "int8")]


def engine_at(checkpoint, dtype, quantization, **overrides) -> LLMEngine:
    return LLMEngine(str(checkpoint), EngineConfig(device="cpu", dtype=dtype, quantization=quantization,
                                                   kv_cache_memory=4 * 2**20, **overrides))


@pytest.mark.parametrize("dtype, quantization", PRECISIONS)
def test_a_decode_step_in_one_call_is_the_same_bits_as_op_by_op(tiny_checkpoint, dtype, quantization):
    engine = engine_at(tiny_checkpoint, dtype, quantization)
    assert isinstance(engine.runner.graphs, CpuDecode)
    for i, prompt in enumerate(random_prompts(5, 3, 70, seed=4)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # prompts in, then decode steps
        engine.step()
    batch = ScheduledBatch(decodes=list(engine.scheduler.running))
    assert len(batch.decodes) == 5
    before = engine.pool.kv.clone()
    fused = engine.runner.due_hidden(batch)
    fused_kv = engine.pool.kv.clone()
    engine.pool.kv.copy_(before)
    fast, engine.runner.graphs = engine.runner.graphs, None
    plain = engine.runner.due_hidden(batch)
    engine.runner.graphs = fast
    assert torch.equal(fused, plain)
    assert torch.equal(fused_kv, engine.pool.kv) and not torch.equal(fused_kv, before)
    for i in range(5):
        engine.abort(f"r{i}")


@pytest.mark.parametrize("dtype, quantization", PRECISIONS[:2])
def test_greedy_tokens_with_and_without_the_compiled_step_are_equal(tiny_checkpoint, dtype, quantization):
    prompts = random_prompts(6, 3, 90, seed=8)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    fused = engine_at(tiny_checkpoint, dtype, quantization)
    eager = engine_at(tiny_checkpoint, dtype, quantization, enforce_eager=True)
    assert isinstance(fused.runner.graphs, CpuDecode) and eager.runner.graphs is None
    want = eager.generate(prompts, params)
    assert fused.generate(prompts, params) == want


def test_the_compiled_step_needs_panels(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("gptserve.model.panel_linear.panel_kernels", lambda: None)
    engine = engine_at(tiny_checkpoint, "float32", None)  # without the kernels: nn.Linear, op by op
    assert engine.runner.graphs is None and not engine.panels
