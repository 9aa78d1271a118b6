"""A sequence's state: its tokens, how many have K/V in the cache, its blocks, its output."""
from __future__ import annotations

import itertools
from enum import Enum, auto

from gptserve.engine.detokenizer import StreamDetokenizer
from gptserve.engine.outputs import FinishReason, Logprob
from gptserve.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SpeculationBackoff:
    """Whether guessing pays for this sequence: the share of its guesses that stood, as a
    moving average; below the threshold it stops guessing for 1, 2, 4, ... 64 steps, then
    tries again (speculative decoding, engine/speculative.py)."""

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


class SequenceStatus(Enum):
    WAITING = auto()  # no blocks; queued for (re)admission
    RUNNING = auto()  # owns blocks; prefilling or decoding
    FINISHED = auto()


class Sequence:
    """One choice of one request. A request with n > 1 has n sibling sequences."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, detokenizer: StreamDetokenizer):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # choice index within the request
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.finish_sent = False  # the finish reason has gone out in a delta
        self.detokenizer = detokenizer
        self.matcher = None  # llguidance.LLMatcher of the request's grammar (engine/grammar.py), if any
        # speculative decoding (engine/speculative.py): this step's guesses of the next tokens,
        # and with a grammar, the matcher after each accepted guess (index 0 is `matcher`)
        self.spec_token_ids: list[int] = []
        self.spec_matchers: list = []
        self.spec_backoff = SpeculationBackoff()
        # news since the last output was sent
        self.new_token_ids: list[int] = []
        self.new_text = ""
        self.new_logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob | None] | None = [None] if params.prompt_logprobs else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def scores_only(self) -> bool:
        """max_tokens 0: the sequence reads (and scores) its prompt and generates nothing."""
        return self.params.max_tokens == 0

    def is_read_after(self, n: int) -> bool:
        """Whether n more computed tokens put all of this sequence's tokens in the cache."""
        return self.num_computed_tokens + n == len(self)

    def is_due_after(self, n: int) -> bool:
        """Whether n more computed tokens make this sequence's next token due."""
        return self.is_read_after(n) and not self.scores_only

    def take_news(self) -> tuple[list[int], str, list[Logprob]]:
        news = self.new_token_ids, self.new_text, self.new_logprobs
        self.new_token_ids, self.new_text, self.new_logprobs = [], "", []
        return news


class VerifyRow:
    """Row j of a sequence whose guesses are being verified: the sequence as if its first j
    guesses were accepted. The sampler reads it as it reads a Sequence."""

    __slots__ = ("seq", "token_ids", "matcher")

    def __init__(self, seq: Sequence, j: int):
        self.seq = seq
        self.token_ids = seq.token_ids + seq.spec_token_ids[:j]
        self.matcher = seq.spec_matchers[j] if seq.matcher is not None else None

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.seq.num_prompt_tokens:]

    @staticmethod
    def rows_of(seq: Sequence) -> list["VerifyRow"]:
        return [VerifyRow(seq, j) for j in range(len(seq.spec_token_ids) + 1)]
