"""Whatever accepted settings a row has, and whatever its logits hold (NaN, +-inf, huge
values, padding columns past the vocabulary), the sampler chooses a token of the
vocabulary, under a grammar one the grammar allows, and reports finite logprobs."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptserve.engine.sampler import Sampler
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.sequence import Sequence
from tests.engine.test_sampler import grammar_mask

V = 40  # the vocabulary: the tokens that may be chosen
PADDING = 8  # logits columns past it, as a padded LM head gives
TINY = 5e-324  # the smallest positive float

temperatures = st.one_of(st.sampled_from([0.0, TINY, 1e-300, 1e-45, 1e-6, 1e-5, 2e-5, 1.0, 2.0]),
                         st.floats(0.0, 2.0))
repetition_penalties = st.one_of(st.sampled_from([TINY, 1e-300, 1e-40, 0.5, 1.0, 10.0]),
                                 st.floats(TINY, 10.0))
penalties = st.one_of(st.sampled_from([-2.0, -TINY, 0.0, TINY, 2.0]), st.floats(-2.0, 2.0))
top_ps = st.one_of(st.sampled_from([TINY, 1e-300, 1e-6, 0.5, 1.0]), st.floats(TINY, 1.0))
min_ps = st.one_of(st.sampled_from([0.0, TINY, 0.5, 1.0]), st.floats(0.0, 1.0))
top_ks = st.sampled_from([0, 1, 2, V - 1, V, V + PADDING, 10**9])
biases = st.dictionaries(st.integers(0, V - 1), st.sampled_from([-100.0, -TINY, 0.0, 100.0]), max_size=4)

params = st.builds(SamplingParams, temperature=temperatures, repetition_penalty=repetition_penalties,
                   presence_penalty=penalties, frequency_penalty=penalties, top_p=top_ps, min_p=min_ps,
                   top_k=top_ks, logit_bias=biases, seed=st.one_of(st.none(), st.integers(0, 2**32)),
                   logprobs=st.sampled_from([None, 0, 3]))
special = st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, 1e30, -1e30, 0.0, 1e-30])


@st.composite
def rows(draw):
    """A batch: each row's settings, tokens, logits (special values here and there) and,
    for some rows, the grammar's allowed tokens (never none: a grammar always allows one)."""
    n = draw(st.integers(1, 4))
    batch = []
    for _ in range(n):
        prompt = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=6))
        output = draw(st.lists(st.integers(0, V - 1), max_size=6))
        seed = draw(st.integers(0, 2**16))
        logits = torch.randn(V + PADDING, generator=torch.Generator().manual_seed(seed)) * draw(
            st.sampled_from([1.0, 30.0, 1e6]))
        for column, value in draw(st.lists(st.tuples(st.integers(0, V + PADDING - 1), special), max_size=8)):
            logits[column] = value
        logits[V:] = draw(st.sampled_from([math.inf, 3e38, math.nan, 50.0]))  # padding never wins
        allowed = draw(st.one_of(st.none(), st.sets(st.integers(0, V - 1), min_size=1)))
        batch.append((draw(params), prompt, output, logits, allowed))
    return batch


def sequences(batch) -> list[Sequence]:
    out = []
    for p, prompt, output, _, _ in batch:
        seq = Sequence("r", 0, prompt, p)
        seq.token_ids.extend(output)
        out.append(seq)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_the_chosen_token_is_in_the_vocabulary_and_the_grammar(batch):
    logits = torch.stack([row[3] for row in batch])
    constrained = {i: row[4] for i, row in enumerate(batch) if row[4] is not None}
    mask = grammar_mask(constrained) if constrained else None
    out = Sampler(V, torch.device("cpu"), seed=0)(logits, sequences(batch), mask)
    assert len(out.token_ids) == len(batch)
    for (p, _, _, _, allowed), token, logprob in zip(batch, out.token_ids, out.logprobs):
        assert 0 <= token < V
        if allowed is not None:
            assert token in allowed
        if p.logprobs is None:
            assert logprob is None
            continue
        assert logprob.token_id == token and math.isfinite(logprob.logprob)
        assert len(logprob.top) == p.logprobs
        assert all(0 <= t < V and math.isfinite(lp) for t, lp in logprob.top)
