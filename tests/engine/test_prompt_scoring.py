"""max_tokens 0 with prompt_logprobs: the engine reads a prompt, scores every token of it
and samples nothing; batched, chunked, preempted or with n choices, each token is scored
once, as the plain model scores it, and every KV block comes back (make_engine checks)."""
from __future__ import annotations

import pytest
import torch

from gptserve.engine.outputs import FinishReason
from gptserve.engine.sampling_params import InvalidSamplingParams, SamplingParams
from gptserve.model.attention import DenseAttention
from tests.engine.conftest import random_prompts

SCORE = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=2)


def scored_alone(model, prompt: list[int]) -> list[float]:
    """The logprob of each prompt token after the first, the prompt run alone through the plain model."""
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), DenseAttention(batch_size=1))
        logprobs = torch.log_softmax(model.logits(hidden).float(), dim=-1)
    return [float(logprobs[i - 1, token]) for i, token in enumerate(prompt) if i]


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Step the engine through the requests; return each one's outputs."""
    outputs: dict[str, list] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def assert_scored(outputs: list, prompt: list[int], model, n: int = 1) -> None:
    [out] = outputs  # one output: the prompt's scores and every choice's end
    assert out.finished and out.error is None
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in out.choices] == \
        [(i, [], "", FinishReason.LENGTH) for i in range(n)]
    lps = out.prompt_logprobs
    assert lps[0] is None and [lp.token_id for lp in lps[1:]] == prompt[1:]
    for got, want in zip(lps[1:], scored_alone(model, prompt), strict=True):
        assert abs(got.logprob - want) < 1e-4
        assert len(got.top) == 2


def test_max_tokens_0_scores_the_prompt_and_samples_nothing(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, 40, 41, seed=11)[0]
    assert_scored(run(engine, {"s": (prompt, SCORE)})["s"], prompt, engine.model)
    assert engine.generation_tokens == 0
    assert engine.sequences_finished == {"length": 1}


def test_chunked_scoring_beside_a_generating_request_scores_each_token_once(make_engine):
    engine = make_engine(max_num_batched_tokens=7)
    scored, generating = random_prompts(2, 30, 60, seed=12)
    outputs = run(engine, {"s": (scored, SCORE),
                           "g": (generating, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))})
    assert_scored(outputs["s"], scored, engine.model)
    assert sum(len(c.token_ids) for out in outputs["g"] for c in out.choices) == 5


def test_n_scoring_choices_read_the_prompt_once(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, 20, 21, seed=13)[0]
    assert_scored(run(engine, {"s": (prompt, SamplingParams(n=3, max_tokens=0, prompt_logprobs=True,
                                                              logprobs=2))})["s"], prompt, engine.model, n=3)
    assert engine.block_manager.prefix_queries == len(prompt)  # one prefill, not three


def test_a_scoring_request_preempted_mid_prefill_scores_each_token_once(make_engine):
    # 6 blocks of 16 tokens, one token of prefill a step: the generating request outgrows
    # the pool while the scoring one is part-way through its prompt, which is preempted
    # and read again from its start
    engine = make_engine(kv_cache_memory=7 * 16 * 1024, block_size=16, max_num_batched_tokens=2)
    assert engine.block_manager.num_blocks == 6
    generating, scored = random_prompts(1, 10, 11, seed=14)[0], random_prompts(1, 60, 61, seed=15)[0]
    outputs = run(engine, {"g": (generating, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)),
                           "s": (scored, SCORE)})
    assert engine.scheduler.num_preemptions > 0
    assert_scored(outputs["s"], scored, engine.model)


def test_a_prompt_that_fills_the_whole_context_can_be_scored(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, 256, 257, seed=16)[0]  # the tiny model's context is 256
    assert_scored(run(engine, {"s": (prompt, SCORE)})["s"], prompt, engine.model)


def test_max_tokens_0_is_only_for_scoring_a_prompt():
    with pytest.raises(InvalidSamplingParams, match="at least 1") as info:
        SamplingParams(max_tokens=0)
    assert info.value.param == "max_tokens"
