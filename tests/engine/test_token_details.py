"""Token details (SamplingParams.token_details): what the grammar allowed and forbade at each
token, and which tokens were speculative guesses the model confirmed; computed only for the
requests that ask, and changing no token."""
from __future__ import annotations

import llguidance
import pytest

from gptserve.config import EngineConfig, SpeculativeConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams

YES_NO = llguidance.LLMatcher.grammar_from_lark('start: ("yes" | "no") " " ("yes" | "no")')


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    engine.add_request("r", prompt, params)
    tokens, details = [], []
    while engine.has_unfinished():
        for out in engine.step():
            for choice in out.choices:
                tokens += choice.token_ids
                details += choice.details or []
                assert (choice.details is None) == (not params.token_details)
    return tokens, details


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(str(tiny_checkpoint), EngineConfig(dtype="float32", kv_cache_memory=16 * 2**20))


def test_under_a_grammar_each_token_says_what_was_allowed_and_what_the_model_wanted_instead(engine):
    params = SamplingParams(max_tokens=8, temperature=0, grammar=YES_NO, token_details=True)
    tokens, details = run(engine, [1, 2, 3], params)
    assert len(details) == len(tokens) and engine.tokenizer.decode(tokens).split()[0] in ("yes", "no")
    first = details[0]
    assert 0 < first.allowed < engine.limits.vocab_size
    assert first.forbidden and tokens[0] not in [t for t, _ in first.forbidden]  # a forbidden token is not chosen
    logprobs = [lp for _, lp in first.forbidden]
    assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
    assert not any(d.guessed for d in details)


def test_without_a_grammar_nothing_is_forbidden(engine):
    _, details = run(engine, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, token_details=True,
                                                       ignore_eos=True))
    assert len(details) == 4 and all(d.allowed is None and d.forbidden == [] for d in details)


def test_asking_for_details_changes_no_token(engine):
    plain = SamplingParams(max_tokens=6, temperature=0, grammar=YES_NO)
    detailed = SamplingParams(max_tokens=6, temperature=0, grammar=YES_NO, token_details=True)
    assert run(engine, [5, 6, 7], plain)[0] == run(engine, [5, 6, 7], detailed)[0]


def test_tokens_from_confirmed_guesses_are_marked(tiny_checkpoint):
    speculative = LLMEngine(str(tiny_checkpoint), EngineConfig(
        dtype="float32", kv_cache_memory=16 * 2**20, speculative=SpeculativeConfig("ngram", max_batch=64)))
    plain = LLMEngine(str(tiny_checkpoint), EngineConfig(dtype="float32", kv_cache_memory=16 * 2**20))
    prompt = [11, 12, 13, 14] * 6  # the greedy answer of a random model soon repeats: n-gram guesses stand
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, token_details=True)
    tokens, details = run(speculative, prompt, params)
    assert tokens == run(plain, prompt, params)[0]
    guessed = [d.guessed for d in details]
    assert any(guessed) and not all(guessed)
    stats = speculative.stats()
    assert sum(guessed) == sum(stats.spec_accepted_tokens.values())
