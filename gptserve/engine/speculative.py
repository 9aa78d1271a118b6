"""Speculative decoding: guess a sequence's next few tokens cheaply, check them in one pass.

The step loop (llm_engine.py) calls the `Speculator` at two points. `propose`, before
scheduling: a proposer (proposers.py: prompt lookup, or a small draft model) guesses up to
k next tokens of every decoding sequence (`seq.decoding.guesses`), trimmed to what the
request's grammar allows. `accept`, after sampling: the guesses that stand are appended,
the K/V of those that did not is given back, and each sequence's back-off learns whether
guessing pays for it.

The scheduler gives a sequence with guesses k+1 rows of the step's batch (its last token
and the k guesses, as a chunk with a cached past); every row is sampled as usual, row j
as if guesses 1..j were accepted (`VerifyRow`: penalties, grammar state and seed position
see those guesses). Guess j+1 stands while it equals row j's token; the first row whose
token differs gives that token instead, and when all k stand the last row gives one more.

Why this is exact: a guess never depends on the target model's random draws, so it is a
point-mass proposal q = δ(d). The rejection-sampling rule of speculative sampling
(Leviathan et al., Chen et al.) accepts it with probability min(1, p(d)/q(d)) = p(d) and
otherwise draws from the residual max(0, p - q), which is p with d removed. Drawing t ~ p
and accepting when t = d is that rule: P(accept) = p(d), and a rejected t is p given
t != d. So each emitted token is a draw from the target's own distribution under the
request's sampling settings, and greedy output is plain greedy decoding's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from gptserve.config import SpeculativeConfig
from gptserve.engine.block_manager import BlockManager
from gptserve.engine.limits import EngineLimits
from gptserve.engine.outputs import Logprob, TokenDetail
from gptserve.engine.proposers import DraftProposer, NgramProposer
from gptserve.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0


def accepted_count(guesses: list[int], tokens: list[int]) -> int:
    """How many leading guesses the verified rows' own tokens confirm: guess j+1 stands
    while row j drew it."""
    a = 0
    while a < len(guesses) and tokens[a] == guesses[a]:
        a += 1
    return a


@dataclass
class SpeculationStats:
    """Counters since start, by method (the /metrics series and the log line)."""

    draft_tokens: dict[str, int] = field(default_factory=dict)  # guesses verified
    accepted_tokens: dict[str, int] = field(default_factory=dict)  # guesses that stood
    verified_sequences: int = 0  # (sequence, step) pairs that carried guesses

    def record(self, method: str, proposed: int, accepted: int) -> None:
        self.draft_tokens[method] = self.draft_tokens.get(method, 0) + proposed
        self.accepted_tokens[method] = self.accepted_tokens.get(method, 0) + accepted
        self.verified_sequences += 1


class Speculator:
    """Speculative decoding as the step loop sees it: guesses before the step, and after
    it the tokens of each verified sequence."""

    def __init__(self, config: SpeculativeConfig, proposer: NgramProposer | DraftProposer,
                 limits: EngineLimits, block_manager: BlockManager):
        self.config, self.proposer = config, proposer
        self.limits, self.block_manager = limits, block_manager
        self.stats = SpeculationStats()
        self._logged = (time.monotonic(), 0)  # when the last log line was written, at how many guesses

    def propose(self, running: list[Sequence]) -> None:
        """Guess the next tokens of the decoding sequences, unless the batch is large enough
        that verifying guesses costs more than the steps they save."""
        decoding = [s for s in running if s.status is SequenceStatus.RUNNING and not s.is_prefill]
        if len(decoding) > self.config.max_batch:
            return
        room = [(seq, self._guess_room(seq)) for seq in decoding if seq.decoding.backoff.ready()]
        room = [(seq, k) for seq, k in room if k > 0]
        if not room:
            return
        seqs, ks = zip(*room)
        for seq, guesses in zip(seqs, self.proposer.propose(list(seqs), list(ks))):
            if seq.matcher is not None and guesses:
                guesses = self._grammar_guesses(seq, guesses)
            seq.decoding.guesses = guesses

    def _guess_room(self, seq: Sequence) -> int:
        """Guesses worth making for seq: a verify emits up to k + 1 tokens, none past
        max_tokens or the context."""
        left = self.limits.max_new_tokens(seq.num_prompt_tokens, seq.params) - seq.num_output_tokens
        return min(self.config.num_speculative_tokens, left - 1, self.limits.max_model_len - len(seq))

    @staticmethod
    def _grammar_guesses(seq: Sequence, guesses: list[int]) -> list[int]:
        """The guesses the grammar allows, and the matcher after each (guess_matchers)."""
        guesses = guesses[:seq.matcher.validate_tokens(guesses)]
        matchers = [seq.matcher]
        for j, token in enumerate(guesses):
            m = matchers[-1].deep_copy()
            m.consume_token(token)
            if m.is_stopped():  # the grammar completes here: no row is sampled after it
                guesses = guesses[:j]
                break
            matchers.append(m)
        seq.decoding.guess_matchers = matchers[:len(guesses) + 1]
        return guesses

    def accept(self, seq: Sequence, tokens: list[int], logprobs: list[Logprob | None],
               details: list[TokenDetail | None],
               append: Callable[[Sequence, int, Logprob | None, TokenDetail | None], None]) -> None:
        """A verified sequence's rows: append (`append(seq, token, logprob, detail)`) the
        guesses that stood (their details say so) and the token of the first row that did
        not confirm one; the K/V of the rest is given back."""
        guesses = seq.decoding.guesses
        accepted = accepted_count(guesses, tokens)
        self.stats.record(self.proposer.method, len(guesses), accepted)
        seq.decoding.backoff.record(len(guesses), accepted, self.config.min_acceptance)
        seq.decoding.keep_guesses(0)
        for j, (token, logprob, detail) in enumerate(zip(tokens[:accepted + 1], logprobs[:accepted + 1],
                                                          details[:accepted + 1])):
            if detail is not None:
                detail.guessed = j < accepted
            append(seq, token, logprob, detail)
            if seq.is_finished:
                return
        seq.num_computed_tokens = len(seq) - 1  # the K/V of the guesses that stood is in the cache
        self.block_manager.trim(seq)
        self.block_manager.commit_computed(seq)

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def log_progress(self) -> None:
        """A log line on the guesses since the last, at most every LOG_EVERY_S."""
        last_time, last_drafted = self._logged
        st = self.stats
        drafted = sum(st.draft_tokens.values())
        if drafted == last_drafted or time.monotonic() - last_time < LOG_EVERY_S:
            return
        accepted = sum(st.accepted_tokens.values())
        log.info("speculative decoding (%s): %d guesses verified, %d accepted (%.1f%%), "
                 "%.2f tokens per verified step", self.proposer.method, drafted, accepted,
                 100 * accepted / drafted, (accepted + st.verified_sequences) / max(1, st.verified_sequences))
        self._logged = (time.monotonic(), drafted)
