"""CUDA-graph decode gives the eager path's tokens, on each GPU (skipped without one).

Each engine is built and run on a fresh thread, whose current CUDA device starts as cuda:0:
on cuda:1 that checks the binding too (capture on another GPU's stream would fail or
replay nothing). The device-independent part of the graphs (static buffers, padding) is
tested on the CPU in test_batching.py.
"""
from __future__ import annotations

import threading

import pytest
import torch

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams


def run_on_a_new_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again below, on the test's thread
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.mark.parametrize("index", [0, 1])
def test_graph_replayed_decode_gives_the_eager_tokens(index, tiny_checkpoint):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        pytest.skip(f"needs cuda:{index}; this machine has {count} CUDA GPU(s)")
    prompts = [[(5 * i + j) % 400 + 1 for j in range(12)] for i in range(4)]  # decode batch 4: a captured size
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def generate(eager: bool):
        cfg = EngineConfig(device=f"cuda:{index}", dtype="float32", kv_cache_memory=64 * 2**20,
                           enforce_eager=eager, cuda_graph_batch_sizes=(1, 2, 4, 8))
        engine = LLMEngine(str(tiny_checkpoint), cfg)
        assert (engine.runner.graphs is None) == eager
        assert engine.pool.kv.device == torch.device(f"cuda:{index}")
        return engine.generate(prompts, params)

    eager = run_on_a_new_thread(lambda: generate(True))
    replayed = run_on_a_new_thread(lambda: generate(False))
    assert replayed == eager
    assert all(len(choices[0]) == 24 for choices in replayed)
