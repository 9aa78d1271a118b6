"""Batched serving gives every request the greedy tokens it would get alone."""
from __future__ import annotations

import pytest
import torch

from gptserve.engine.outputs import FinishReason, PromptTooLongError
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.panel_linear import PanelLinear
from gptserve.weights.loader import load_model
from tests.engine.conftest import assert_same_greedy, random_prompts, run_collect

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=0)


def run_all(engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]):
    """Step the engine, adding requests at the step numbers given; return tokens per request."""
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params)
            tokens[rid], logprobs[rid] = [], []
        for out in engine.step():
            for c in out.choices:
                tokens[out.request_id].extend(c.token_ids)
                logprobs[out.request_id].extend(lp.logprob for lp in c.logprobs)
        step += 1
    return tokens, logprobs


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "pytorch-path"])
def test_mixed_lengths_in_one_batch_match_running_alone(make_engine, kernel, monkeypatch):
    if not kernel:  # op by op (the compiled decode step calls the kernel itself)
        monkeypatch.setattr("gptserve.model.attention.paged_decode", lambda: None)
    engine = make_engine() if kernel else make_engine(enforce_eager=True)
    prompts = random_prompts(10, 3, 120, seed=1)
    outs = run_collect(engine, prompts, SamplingParams(max_tokens=24, **GREEDY))
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert len(tokens) == 24
        assert_same_greedy(tokens, prompt, engine.model, logprobs)


def test_the_engine_holds_its_cpu_model_in_panels_and_still_matches_the_plain_model(make_engine, tiny_checkpoint):
    engine = make_engine(dtype="float32")
    assert engine.panels  # float32 on the CPU: the kernels' panels
    plain = load_model(tiny_checkpoint)  # a separate, plain copy as the reference
    prompts = random_prompts(6, 3, 80, seed=7)
    outs = run_collect(engine, prompts, SamplingParams(max_tokens=20, **GREEDY))
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert_same_greedy(tokens, prompt, plain, logprobs)


@pytest.mark.parametrize("dtype, quantization", [("bfloat16", None), ("float16", None), ("auto", "int8")])
def test_compact_cpu_weights_in_a_batch_match_running_alone(make_engine, dtype, quantization):
    """16- and 8-bit weights: decode batches of up to four rows widen the weights in registers,
    larger ones and prefill in a buffer; each request still gets its tokens alone."""
    engine = make_engine(dtype=dtype, quantization=quantization)
    fmt = quantization or dtype
    assert str(engine.precision) == f"{fmt} weights, float32 compute" and engine.pool.kv.dtype == torch.float32
    assert isinstance(engine.model.lm_head, PanelLinear) and engine.model.lm_head.fmt == fmt
    prompts = random_prompts(7, 3, 90, seed=5)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):  # 1 to 7 running at once, through both paths
        arrivals.setdefault(i * 4, []).append((f"r{i}", p, SamplingParams(max_tokens=12, **GREEDY)))
    tokens, logprobs = run_all(engine, arrivals)
    for i, p in enumerate(prompts):
        assert len(tokens[f"r{i}"]) == 12
        assert_same_greedy(tokens[f"r{i}"], p, engine.model, logprobs[f"r{i}"])


def test_staggered_arrivals_match_running_alone(make_engine):
    engine = make_engine()
    prompts = random_prompts(8, 5, 90, seed=2)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(prompts):
        arrivals.setdefault(i * 3, []).append((f"r{i}", p, SamplingParams(max_tokens=10 + 3 * i, **GREEDY)))
    tokens, logprobs = run_all(engine, arrivals)
    for i, p in enumerate(prompts):
        assert len(tokens[f"r{i}"]) == 10 + 3 * i
        assert_same_greedy(tokens[f"r{i}"], p, engine.model, logprobs[f"r{i}"])


def test_chunked_prefill_matches_running_alone(make_engine):
    engine = make_engine(max_num_batched_tokens=16)
    prompts = random_prompts(4, 60, 150, seed=3)
    outs = run_collect(engine, prompts, SamplingParams(max_tokens=16, **GREEDY))
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert_same_greedy(tokens, prompt, engine.model, logprobs)


def test_prefix_cache_hits_share_blocks_and_keep_outputs(make_engine):
    engine = make_engine(block_size=16)
    shared = random_prompts(1, 70, 71, seed=4)[0]
    tails = random_prompts(4, 3, 20, seed=5)
    first = run_collect(engine, [shared + tails[0]], SamplingParams(max_tokens=8, **GREEDY))
    assert engine.block_manager.prefix_hits == 0
    rest = run_collect(engine, [shared + t for t in tails[1:]], SamplingParams(max_tokens=8, **GREEDY))
    assert engine.block_manager.prefix_hits >= 3 * (len(shared) // 16) * 16
    for tail, (tokens, logprobs) in zip(tails, first + rest):
        assert_same_greedy(tokens, shared + tail, engine.model, logprobs)


def test_preemption_on_a_tiny_pool_completes_every_request_correctly(make_engine):
    # 24 blocks of 16 tokens; 8 requests of ~80 tokens need ~40 blocks at once
    engine = make_engine(kv_cache_memory=25 * 16 * 1024, block_size=16)
    assert engine.block_manager.num_blocks == 24
    prompts = random_prompts(8, 30, 50, seed=6)
    outs = run_collect(engine, prompts, SamplingParams(max_tokens=40, **GREEDY))
    assert engine.scheduler.num_preemptions > 0
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert len(tokens) == 40
        assert_same_greedy(tokens, prompt, engine.model, logprobs)


def test_n_choices_share_the_prompt_blocks(make_engine):
    engine = make_engine(block_size=16)
    prompt = random_prompts(1, 64, 65, seed=7)[0]
    engine.add_request("n3", prompt, SamplingParams(n=3, max_tokens=6, **GREEDY))
    seen_shared = False
    results = [[], [], []]
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.choices:
                results[c.index].extend(c.token_ids)
        tables = [s.block_table for s in engine.requests.get("n3").seqs] if "n3" in engine.requests else []
        if len(tables) == 3 and all(tables):
            seen_shared |= tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert seen_shared, "siblings never shared the prompt's full blocks"
    assert results[0] == results[1] == results[2]
    assert_same_greedy(results[0], prompt, engine.model)


def test_a_request_that_can_never_fit_is_refused(make_engine):
    engine = make_engine(kv_cache_memory=9 * 16 * 1024, block_size=16)  # 8 blocks: 128 tokens
    with pytest.raises(PromptTooLongError, match="128 tokens"):
        engine.add_request("big", list(range(100)), SamplingParams(max_tokens=100))
    with pytest.raises(PromptTooLongError, match="maximum context length is 256"):
        make_engine().add_request("long", list(range(250)), SamplingParams(max_tokens=10))


def test_abort_mid_generation_frees_its_blocks(make_engine):
    engine = make_engine()
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=100, **GREEDY))
    engine.add_request("b", list(range(20)), SamplingParams(max_tokens=5, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort("a")
    assert out.finished and out.choices[0].finish_reason is FinishReason.ABORT
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, 10, 11, seed=8)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = engine.generate([prompt], seeded)[0][0]
    others = random_prompts(5, 5, 60, seed=9)
    noisy = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    together = engine.generate([*others[:2], prompt, *others[2:]], [noisy, noisy, seeded, noisy, noisy, noisy])
    assert together[2][0] == alone
    unseeded = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
    assert unseeded[0][0] != alone


def test_padded_static_decode_batches_of_cuda_graphs_match_running_alone(make_engine, speculation):
    """The CUDA-graph path's padding and scratch block, run eagerly on the CPU."""
    from gptserve.engine.cuda_graphs import DecodeGraphs

    if speculation is not None:
        pytest.skip("graphs replay decode-only steps; a step that verifies guesses runs eagerly")
    engine = make_engine()
    runner = engine.runner
    runner.graphs = DecodeGraphs(engine.model, engine.pool, runner.max_blocks, (1, 2, 4, 8), capture=False)
    prompts = random_prompts(6, 5, 60, seed=12)  # 6 decodes pad to 8; fewer as they finish
    params = [SamplingParams(max_tokens=8 + 2 * i, **GREEDY) for i in range(6)]
    outs = run_collect(engine, prompts, params)
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert_same_greedy(tokens, prompt, engine.model, logprobs)
    assert runner.graphs.outputs.keys() >= {8, 4}
