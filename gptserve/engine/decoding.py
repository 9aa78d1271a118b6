"""How one sequence's output is decoded: its text, its grammar, when it stops, its guesses.

A `Sequence` (sequence.py) is what the scheduler and the block manager see: tokens, K/V,
blocks. Its `Decoding` is the rest of a choice's state: the detokenizer that turns tokens
into text and finds stop strings, the grammar's matcher (grammar.py), the stop rules, and
with speculative decoding (speculative.py) this step's guesses and the back-off that
decides whether guessing pays.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptserve.engine.detokenizer import StreamDetokenizer
from gptserve.engine.outputs import FinishReason, GrammarError
from gptserve.engine.sampling_params import SamplingParams
from gptserve.grammar_limits import describe


@dataclass(frozen=True)
class Finish:
    """Why a sequence ends at a token; `flush`: whether text held back for a possible stop
    string is still to be sent (not when a stop string ended it)."""

    reason: FinishReason
    stop_reason: str | int | None = None
    flush: bool = True


class SpeculationBackoff:
    """Whether guessing pays for this sequence: the share of its guesses that stood, as a
    moving average; below the threshold it stops guessing for 1, 2, 4, ... 64 steps, then
    tries again."""

    __slots__ = ("acceptance", "skip", "wait")
    MAX_WAIT = 64

    def __init__(self):
        self.acceptance = 1.0  # optimistic until guesses are checked
        self.skip = 0  # steps left without guessing
        self.wait = 1  # the next back-off's length

    def ready(self) -> bool:
        """Whether to guess this step (counts a skipped step down)."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int, threshold: float) -> None:
        self.acceptance = 0.5 * self.acceptance + 0.5 * accepted / proposed
        if self.acceptance >= threshold:
            self.wait = 1
            return
        self.skip, self.wait = self.wait, min(2 * self.wait, self.MAX_WAIT)
        self.acceptance = threshold  # one good verify after the pause brings it back


class Decoding:
    """One choice's decoding state. `max_output_tokens`: where the length limit ends it
    (max_tokens, or the context)."""

    def __init__(self, detokenizer: StreamDetokenizer, params: SamplingParams, eos_token_id: int,
                 max_output_tokens: int, matcher=None):
        self.detokenizer = detokenizer
        self.params = params
        self.eos_token_id = eos_token_id
        self.max_output_tokens = max_output_tokens
        self.matcher = matcher  # llguidance.LLMatcher of the request's grammar, if any
        self.guesses: list[int] = []  # this step's guesses of the next tokens
        self.guess_matchers: list = []  # with a grammar, the matcher after each guess (index 0 is `matcher`)
        self.backoff = SpeculationBackoff()

    def next_token(self, token: int, num_output_tokens: int) -> tuple[str, Finish | None]:
        """The text that `token` (output token number `num_output_tokens`) adds, and why the
        output ends with it (None: it goes on). Raises GrammarError if the grammar fails."""
        p, matcher = self.params, self.matcher
        if matcher is not None and (not matcher.consume_token(token) or matcher.is_error()):
            # a matcher that failed while its mask was computed allowed EOS alone, and takes it
            raise GrammarError(f"the grammar failed at output token {num_output_tokens}: "
                               f"{describe(matcher.get_error())}")
        if token == self.eos_token_id and (not p.ignore_eos or matcher is not None):
            return "", Finish(FinishReason.STOP)
        if token in p.stop_token_ids:
            return "", Finish(FinishReason.STOP, token)
        text, stop = self.detokenizer.push(token)
        if stop is not None:
            return text, Finish(FinishReason.STOP, stop, flush=False)
        if matcher is not None and matcher.is_stopped():  # the grammar is complete
            return text, Finish(FinishReason.STOP)
        if num_output_tokens >= self.max_output_tokens:
            return text, Finish(FinishReason.LENGTH)
        return text, None

    def keep_guesses(self, k: int) -> None:
        """Keep the first k guesses (0: none), as room in the batch allows."""
        del self.guesses[k:], self.guess_matchers[k + 1:]
        if not k:
            self.guess_matchers = []
