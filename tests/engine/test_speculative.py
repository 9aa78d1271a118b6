"""Speculative decoding: guesses are made and verified, and the output is exactly the
model's own, greedy and sampled. (Every other engine test also runs with each method: see
the `speculation` fixture.)"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from gptserve.config import EngineConfig, SpeculativeConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.proposers import NgramProposer
from gptserve.engine.speculative import accepted_count
from gptserve.model.attention import DenseAttention
from tests.engine.conftest import assert_same_greedy, random_prompts, run_collect

GREEDY = dict(temperature=0.0, ignore_eos=True)


def engine_with(checkpoint, method: str | None, **spec) -> LLMEngine:
    speculative = SpeculativeConfig(method, **{"max_batch": 1024, **spec}) if method else None
    return LLMEngine(str(checkpoint), EngineConfig(kv_cache_memory=8 * 2**20, dtype="float32",
                                                   speculative=speculative, max_num_seqs=256))


def test_ngram_guesses_follow_the_latest_longest_match():
    proposer = NgramProposer(SpeculativeConfig("ngram", ngram_min=1, ngram_max=3))
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    # the suffix [2, 6, 7] never occurred before; [6, 7] did, latest at 5: what followed is 9, 2, 6
    assert proposer._lookup(tokens, 3) == [9, 2, 6]
    assert proposer._lookup(tokens, 1) == [9]
    assert proposer._lookup([1, 2, 3], 4) == []  # no earlier occurrence of any suffix


def test_the_guesses_that_stand_are_those_the_rows_drew_in_order():
    assert accepted_count([4, 5, 6], [4, 5, 9, 1]) == 2
    assert accepted_count([4, 5, 6], [3, 5, 6, 1]) == 0
    assert accepted_count([4, 5, 6], [4, 5, 6, 1]) == 3


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_plain_greedy_and_guesses_are_accepted(tiny_checkpoint, tiny_draft_checkpoint, method):
    """The tiny random model falls into loops, which prompt lookup predicts; its own first
    layer as a draft is right part of the time: both paths (accept, reject) are taken."""
    engine = engine_with(tiny_checkpoint, method, num_speculative_tokens=4, draft_model=str(tiny_draft_checkpoint))
    prompts = random_prompts(5, 5, 40, seed=21)
    outs = run_collect(engine, prompts, SamplingParams(max_tokens=48, logprobs=0, **GREEDY))
    for prompt, (tokens, logprobs) in zip(prompts, outs):
        assert_same_greedy(tokens, prompt, engine.model, logprobs)
    st = engine.speculator.stats
    assert 0 < st.accepted_tokens[method] < st.draft_tokens[method]
    assert engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(tiny_checkpoint):
    """A seeded row's noise is keyed by its position, so a token drawn in a verify row is the
    token plain decoding draws there."""
    params = SamplingParams(temperature=0.8, top_k=3, seed=7, max_tokens=40, ignore_eos=True, n=2)
    prompts = random_prompts(3, 5, 30, seed=22)
    plain = engine_with(tiny_checkpoint, None).generate(prompts, params)
    ngram = engine_with(tiny_checkpoint, "ngram")
    assert ngram.generate(prompts, params) == plain
    assert ngram.speculator.stats.accepted_tokens["ngram"] > 0


def test_structured_output_keeps_its_grammar_across_accepted_guesses(tiny_checkpoint):
    params = SamplingParams(max_tokens=40, grammar=_regex_grammar("(amen, ){6}so be it"), **GREEDY)
    prompt = random_prompts(1, 10, 11, seed=23)[0]
    plain = engine_with(tiny_checkpoint, None).generate([prompt], params)[0][0]
    engine = engine_with(tiny_checkpoint, "ngram")
    got = engine.generate([prompt], params)[0][0]
    assert got == plain
    assert engine.tokenizer.decode(got) == "amen, " * 6 + "so be it"
    assert engine.speculator.stats.accepted_tokens["ngram"] > 0  # ", amen" repeats: guesses stood


def test_stop_strings_and_max_tokens_cut_inside_an_accepted_run(tiny_checkpoint):
    prompt = random_prompts(1, 10, 11, seed=24)[0]
    plain = engine_with(tiny_checkpoint, None)
    text = plain.tokenizer.decode(plain.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0][0])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    for params in (SamplingParams(max_tokens=40, stop=[stop], **GREEDY), SamplingParams(max_tokens=13, **GREEDY)):
        engine = engine_with(tiny_checkpoint, "ngram", num_speculative_tokens=5)
        outs = [engine_with(tiny_checkpoint, None), engine]
        results = [_texts(e, prompt, params) for e in outs]
        assert results[0] == results[1]
        assert engine.block_manager.num_used_blocks == 0


# ---- exactness under sampling ---------------------------------------------------------------
SAMPLED = SamplingParams(temperature=0.9, top_k=3, frequency_penalty=0.3, max_tokens=3, ignore_eos=True)
CHI2_26_DOF_P001 = 54.05  # the chi-square distribution's 0.999 quantile at 26 degrees of freedom


def test_sampled_tokens_follow_the_models_distribution_exactly(tiny_checkpoint):
    """The joint distribution of the first three sampled tokens, with the model as its own
    draft (its guess is the argmax of the next token), against the exact distribution
    computed from the model under the same settings (3 x 3 x 3 cells under top_k 3). The
    second and third tokens come from verify rows whenever a guess was made. A verifier
    that accepted a guess because it is the model's argmax would fail this test: the last
    check shows that it would."""
    prompt = random_prompts(1, 12, 13, seed=25)[0]
    engine = engine_with(tiny_checkpoint, "draft", num_speculative_tokens=1, draft_model=str(tiny_checkpoint))
    exact = _exact_distribution(engine, prompt, SAMPLED, 3)
    assert len(exact) == 27
    samples = [tuple(choice) for req in engine.generate([prompt] * 40, _with(SAMPLED, n=50)) for choice in req]
    assert min(exact.values()) * len(samples) > 5  # enough draws for the chi-square approximation
    assert engine.speculator.stats.draft_tokens["draft"] > 0.5 * len(samples)  # most second tokens were verified
    assert engine.speculator.stats.accepted_tokens["draft"] > 0.05 * len(samples)  # third tokens from verify rows
    assert _chi_square(Counter(samples), exact, len(samples)) < CHI2_26_DOF_P001
    # the same check fails a verifier that always accepts the guess: the second token would
    # always be the likeliest one, the third drawn after it
    first, pair = Counter(), Counter()
    for (a, b, _), p in exact.items():
        first[a] += p
        pair[(a, b)] += p
    guess = {a: max((b for x, b in pair if x == a), key=lambda b: pair[(a, b)]) for a in first}
    biased = Counter({(a, b, c): first[a] * p / pair[(a, b)] * len(samples)
                      for (a, b, c), p in exact.items() if b == guess[a]})
    assert _chi_square(biased, exact, len(samples)) > CHI2_26_DOF_P001


def _chi_square(counts: Counter, exact: dict, n: int) -> float:
    assert set(counts) <= set(exact), "a draw outside the distribution's support"
    return sum((counts.get(cell, 0) - n * p) ** 2 / (n * p) for cell, p in exact.items())


@torch.inference_mode()
def _exact_distribution(engine: LLMEngine, prompt: list[int], p: SamplingParams, length: int) -> dict:
    """P(t1, ..., t_length) under temperature, top_k and frequency_penalty, from the plain model."""
    def dist(outputs: list[int]) -> torch.Tensor:
        ids = prompt + outputs
        hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)), DenseAttention(batch_size=1))
        logits = engine.model.logits(hidden[-1:])[0].float()
        for t in outputs:
            logits[t] -= p.frequency_penalty
        logits = logits / p.temperature
        return logits.masked_fill(logits < logits.topk(p.top_k).values[-1], float("-inf")).softmax(-1)

    out = {(): 1.0}
    for _ in range(length):
        out = {seq + (t,): q * float(probs[t]) for seq, q in out.items()
               for probs in [dist(list(seq))] for t in probs.nonzero().flatten().tolist()}
    return out


def _with(params: SamplingParams, **changes) -> SamplingParams:
    from dataclasses import replace
    return replace(params, **changes)


def _texts(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[str, str | None]:
    engine.add_request("t", prompt, params)
    text, reason = "", None
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.choices:
                text += c.text
                reason = c.finish_reason or reason
    return text, reason


def _regex_grammar(regex: str) -> str:
    import llguidance
    return llguidance.LLMatcher.grammar_from_regex(regex)
