"""Per-row sampling settings, applied to a batch at once."""
from __future__ import annotations

import math

import numpy as np
import torch

from gptserve.engine.sampler import LOGPROB_FLOOR, Sampler
from gptserve.engine.sampling_params import SamplingParams
from gptserve.engine.sequence import Sequence

V = 50


def seqs(*params: SamplingParams, tokens=(1, 2, 3)) -> list[Sequence]:
    return [Sequence("r", 0, list(tokens), p) for p in params]


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def grammar_mask(allowed: dict[int, set[int]], vocab: int = V) -> tuple[list[int], torch.Tensor]:
    """The mask of the constrained rows (row -> allowed tokens) in llguidance's layout: one
    bit a token, little-endian, in int32 words."""
    bits = np.zeros((len(allowed), -(-vocab // 32) * 32), dtype=np.uint8)
    for i, tokens in enumerate(allowed.values()):
        bits[i, sorted(tokens)] = 1
    return list(allowed), torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy())


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(3)
    out = sampler(logits, seqs(SamplingParams(temperature=0), SamplingParams(temperature=1.0),
                               SamplingParams(temperature=0)))
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())


def test_top_k_1_top_p_tiny_and_min_p_1_all_reduce_to_greedy():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(3, seed=1)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0)]
    for _ in range(20):
        out = sampler(logits, seqs(*params))
        assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_k_best():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(1, seed=2)
    best5 = set(logits[0].topk(5).indices.tolist())
    drawn = {sampler(logits, seqs(SamplingParams(temperature=2.0, top_k=5))).token_ids[0] for _ in range(200)}
    assert drawn <= best5 and len(drawn) > 1


def test_sampling_follows_the_softmax_distribution():
    sampler = Sampler(V, torch.device("cpu"), seed=3)
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-30.0] * (V - 3)])
    n = 4000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[sampler(logits, seqs(SamplingParams(temperature=1.0))).token_ids[0]] += 1
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # p = 0.001 with 2 degrees of freedom


def test_logit_bias_forces_and_bans_tokens():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(2, seed=4)
    out = sampler(logits, seqs(SamplingParams(temperature=0, logit_bias={7: 100.0}),
                               SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100.0})))
    assert out.token_ids[0] == 7
    assert out.token_ids[1] == int(logits[1].topk(2).indices[1])


def test_presence_frequency_and_repetition_penalties_lower_seen_tokens():
    sampler = Sampler(V, torch.device("cpu"))
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 9] = 1.0, 0.9
    # token 5 was generated before: each penalty alone pushes it below token 9
    for p in (SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(temperature=0, frequency_penalty=0.5),
              SamplingParams(temperature=0, repetition_penalty=1.5)):
        s = seqs(p, tokens=(1,))
        s[0].token_ids.append(5)
        assert sampler(logits, s).token_ids[0] == 9
    assert sampler(logits, seqs(SamplingParams(temperature=0), tokens=(1,))).token_ids[0] == 5


def test_logprobs_are_the_models_log_softmax_with_sorted_alternatives():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(2, seed=5)
    out = sampler(logits, seqs(SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)))
    lp = torch.log_softmax(logits[0], -1)
    first = out.logprobs[0]
    assert math.isclose(first.logprob, float(lp.max()), abs_tol=1e-5)
    assert [t for t, _ in first.top] == lp.topk(3).indices.tolist()
    assert out.logprobs[1] is None


def test_a_seeded_row_draws_the_same_tokens_whatever_its_neighbours():
    cpu = torch.device("cpu")
    logits = logits_rows(4, seed=6)
    logits[2] = 0.0  # the seeded row is flat over V tokens: 60 draws agree by chance with p = V**-60

    def draws(sampler: Sampler, batch: list[Sequence], row: int, steps: int = 60) -> list[int]:
        rows = logits[2:3] if len(batch) == 1 else logits
        out = []
        for _ in range(steps):  # each step samples the next position, as decoding does
            tokens = sampler(rows, batch).token_ids
            for seq, token in zip(batch, tokens):
                seq.token_ids.append(token)
            out.append(tokens[row])
        return out

    p = SamplingParams(temperature=1.0, seed=42)
    alone = draws(Sampler(V, cpu, seed=1), seqs(p), 0)
    # other batch generators, unseeded neighbours drawing from them on every step
    mixed = draws(Sampler(V, cpu, seed=2), seqs(SamplingParams(temperature=1.0), SamplingParams(temperature=1.0), p,
                                                 SamplingParams(temperature=0.7, top_k=5)), 2)
    assert alone == mixed
    assert len(set(alone)) > 10, "the seeded row is not really sampling"
    other_seed = draws(Sampler(V, cpu, seed=1), seqs(SamplingParams(temperature=1.0, seed=43)), 0)
    assert other_seed != alone


# --- settings at their edges: the token is in the vocabulary and, under a grammar, allowed ---

TINY = 5e-324  # the smallest positive float: 0 in float32


def test_a_temperature_under_the_greedy_bound_is_greedy():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(3, seed=7)
    for temperature in (TINY, 1e-300, 9e-6):
        out = sampler(logits, seqs(*[SamplingParams(temperature=temperature)] * 3))
        assert out.token_ids == logits.argmax(-1).tolist()


def test_columns_past_the_vocabulary_are_never_chosen():
    """A padded LM head has more columns than the tokenizer has tokens."""
    sampler = Sampler(V, torch.device("cpu"))
    logits = torch.cat([logits_rows(2, seed=8), torch.full((2, 6), 1e30)], dim=1)
    logits[1, V + 2] = float("nan")
    for p in (SamplingParams(temperature=0), SamplingParams(temperature=2.0), SamplingParams(top_k=10**9)):
        out = sampler(logits, seqs(p, p), grammar_mask({1: set(range(V))}))
        assert all(0 <= t < V for t in out.token_ids)


def test_a_vanishing_repetition_penalty_makes_the_seen_positive_token_certain():
    sampler = Sampler(V, torch.device("cpu"))
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 9], logits[0, 11] = 0.1, 3.0, -2.0  # 5 and 11 seen: 5 divided by ~0 is +inf
    for p in (SamplingParams(temperature=0, repetition_penalty=TINY),
              SamplingParams(temperature=1.0, repetition_penalty=TINY), SamplingParams(repetition_penalty=1e-40)):
        assert sampler(logits, seqs(p, tokens=(5, 11))).token_ids == [5]


def test_under_a_grammar_a_vanishing_penalty_still_chooses_an_allowed_token():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(1, seed=9).abs()  # every seen token is pushed to +inf, the allowed ones unseen
    allowed = {2, 17}
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, repetition_penalty=TINY)
        for _ in range(20):
            out = sampler(logits, seqs(p, tokens=(1, 3, 4, 30)), grammar_mask({0: allowed}))
            assert out.token_ids[0] in allowed


def test_a_row_whose_settings_leave_no_allowed_token_takes_the_models_best_allowed():
    """Divided by a temperature of 1e-5, every allowed logit (-1e34, -2e34) is -inf: the row
    falls back to the allowed token the model ranks first."""
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(2, seed=10)
    logits[:, 4], logits[:, 6] = -2e34, -1e34
    logits[1, 4], logits[1, 6] = float("-inf"), float("nan")  # nothing finite: still an allowed token
    for p in (SamplingParams(temperature=1e-5), SamplingParams(temperature=0, top_k=1, min_p=1.0)):
        out = sampler(logits, seqs(p, p), grammar_mask({0: {4, 6}, 1: {4, 6}}))
        assert out.token_ids[0] == 6 and out.token_ids[1] in {4, 6}


def test_top_p_of_the_smallest_float_keeps_the_best_token():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(2, seed=11)
    out = sampler(logits, seqs(*[SamplingParams(temperature=2.0, top_p=TINY)] * 2))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_logprobs_are_finite_even_for_a_token_the_model_rules_out():
    sampler = Sampler(V, torch.device("cpu"))
    logits = logits_rows(1, seed=12)
    logits[0, 3] = float("-inf")  # the grammar allows only the token the model gives no probability
    out = sampler(logits, seqs(SamplingParams(temperature=0, logprobs=V)), grammar_mask({0: {3}}))
    [lp] = out.logprobs
    assert out.token_ids == [3] and lp.logprob == LOGPROB_FLOOR
    assert all(math.isfinite(v) for _, v in lp.top) and lp.top[-1] == (3, LOGPROB_FLOOR)
