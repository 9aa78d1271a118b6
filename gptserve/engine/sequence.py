"""A sequence's state: its tokens, how many have K/V in the cache, its blocks, its output
not yet sent. How its output is decoded (text, grammar, stop rules, guesses) is its
`Decoding` (decoding.py)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

from gptserve.engine.decoding import Decoding
from gptserve.engine.outputs import ChoiceDelta, FinishReason, Logprob, TokenDetail
from gptserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gptserve.engine.lora import Adapter

_seq_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()  # no blocks; queued for (re)admission
    RUNNING = auto()  # owns blocks; prefilling or decoding
    FINISHED = auto()


class Sequence:
    """One choice of one request. A request with n > 1 has n sibling sequences."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, decoding: Decoding | None = None, adapter: "Adapter | None" = None):
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
        self.decoding = decoding  # None for a sequence no output is made of (a draft model's view)
        self.adapter = adapter  # its LoRA adapter (engine/lora.py), None for the base model
        self.lora_slot = -1  # the adapter's slot in the model while it runs
        # the root of its blocks' prefix-cache hashes: an adapter's KV never serves another's
        self.cache_root: int | None = None if adapter is None else hash(("lora", adapter.cache_key))
        # news since the last output was sent
        self.new_token_ids: list[int] = []
        self.new_text = ""
        self.new_logprobs: list[Logprob] = []
        self.new_details: list[TokenDetail] = []
        self.prompt_logprobs: list[Logprob | None] | None = [None] if params.prompt_logprobs else None

    @property
    def matcher(self):
        """The grammar's matcher at this sequence's next token (None: no grammar)."""
        return None if self.decoding is None else self.decoding.matcher

    @property
    def guesses(self) -> list[int]:
        return [] if self.decoding is None else self.decoding.guesses

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

    def append_output(self, token: int, logprob: Logprob | None, detail: TokenDetail | None = None) -> None:
        self.token_ids.append(token)
        self.new_token_ids.append(token)
        if logprob is not None:
            self.new_logprobs.append(logprob)
        if detail is not None:
            self.new_details.append(detail)

    def take_delta(self) -> ChoiceDelta | None:
        """What is new since the last delta (None: nothing, and no finish to tell)."""
        ids, text, logprobs, details = self.new_token_ids, self.new_text, self.new_logprobs, self.new_details
        if not (ids or text or (self.is_finished and not self.finish_sent)):
            return None
        self.new_token_ids, self.new_text, self.new_logprobs, self.new_details = [], "", [], []
        self.finish_sent = self.is_finished
        return ChoiceDelta(self.index, text, ids, logprobs if self.params.logprobs is not None else None,
                           self.finish_reason, self.stop_reason, details if self.params.token_details else None)


class VerifyRow:
    """Row j of a sequence whose guesses are being verified: the sequence as if its first j
    guesses were accepted. The sampler reads it as it reads a Sequence."""

    __slots__ = ("seq", "token_ids", "matcher")

    def __init__(self, seq: Sequence, j: int):
        self.seq = seq
        self.token_ids = seq.token_ids + seq.guesses[:j]
        self.matcher = seq.decoding.guess_matchers[j] if seq.matcher is not None else None

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
        return [VerifyRow(seq, j) for j in range(len(seq.guesses) + 1)]


@dataclass
class Request:
    """A request's sequences: one per choice (n)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    parked: list[Sequence] = field(default_factory=list)  # n > 1 siblings, admitted after the prompt is cached
    sent_first: bool = False


def rows_by_sequence(rows: list, tokens: list[int], logprobs: list,
                     details: list) -> list[tuple[Sequence, list[int], list, list]]:
    """The step's sampled rows grouped by sequence, in row order (a verify has several):
    (sequence, tokens, logprobs, token details)."""
    grouped: dict[int, tuple[Sequence, list[int], list, list]] = {}
    for row, token, logprob, detail in zip(rows, tokens, logprobs, details):
        seq = row.seq if isinstance(row, VerifyRow) else row
        _, seq_tokens, seq_logprobs, seq_details = grouped.setdefault(seq.seq_id, (seq, [], [], []))
        seq_tokens.append(token)
        seq_logprobs.append(logprob)
        seq_details.append(detail)
    return list(grouped.values())
