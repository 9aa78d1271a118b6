"""What the engine hands back to its callers: per-step deltas, and the errors it raises."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the caller went away
    ERROR = "error"  # the engine failed this request (the caller gets an error, not this reason)


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # alternatives, most likely first


@dataclass
class TokenDetail:
    """What the server did to one generated token, for requests that ask (token_details):
    how many tokens the grammar allowed at that step (None: no grammar), the model's most
    likely tokens it forbade, with their logprobs before the mask, and whether the token was
    a speculative guess that the model confirmed."""

    allowed: int | None = None
    forbidden: list[tuple[int, float]] = field(default_factory=list)
    guessed: bool = False


@dataclass
class ChoiceDelta:
    """New output of one choice (of n) since the last RequestOutput."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    details: list[TokenDetail] | None = None  # one per token, when the request asks (token_details)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[ChoiceDelta]  # only choices with news this step
    finished: bool  # every choice has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[Logprob | None] | None = None  # first output only, when asked
    error: str | None = None  # set when the engine failed this request (finished is True)
    grammar_failed: bool = False  # the failure was the request's own grammar's (a client error), not the engine's


@dataclass
class Inspection:
    """What the model does with one prompt: attention of every layer and head, and its
    most likely next tokens."""

    attention: list[list[list[list[float]]]]  # [layer][head][query][key]; rows sum to 1
    top_next_tokens: list[tuple[int, float]]  # (token id, probability), most likely first


@dataclass
class Explanation:
    """One prompt through the model step by step, at one chosen token (`position`): the
    playground's Explain view. Vectors are the model's own, rounded; strips are a vector
    averaged into at most a fixed number of cells."""

    position: int
    token_vectors: list[list[float]]  # per token: its token embedding (wte row), as a strip
    position_vectors: list[list[float]]  # per token: its position embedding (wpe row), as a strip
    norms: list[tuple[float, float, float]]  # per token: |token|, |position|, |their sum|
    projection: list[tuple[float, float]]  # per token: the sum vector on the prompt's first two principal axes
    scores: list[list[list[float | None]]]  # [layer][head][key]: the position's Q.K/sqrt(d), before softmax
    weights: list[list[list[float]]]  # [layer][head][key]: the same after softmax (keys after it: none)
    neurons: list[list[tuple[int, float]]]  # [layer]: the most active MLP neurons at the position (after GELU)
    residual: list[tuple[float, float, float]]  # [layer]: |x| at the position before the block, after attention, after the MLP
    logits: list[tuple[int, float]]  # the position's next-token logits, highest first


@dataclass
class EngineStats:
    num_requests_running: int  # requests with a sequence in the running batch
    num_requests_waiting: int  # the other unfinished requests
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    prompt_tokens: int  # counters since start
    generation_tokens: int
    sequences_finished: dict[str, int] = field(default_factory=dict)  # by finish reason, since start
    spec_draft_tokens: dict[str, int] = field(default_factory=dict)  # speculative guesses verified, by method
    spec_accepted_tokens: dict[str, int] = field(default_factory=dict)  # of those, guesses that stood

    @classmethod
    def merge(cls, parts: list["EngineStats"]) -> "EngineStats":
        """Several engines' stats as one: counts added up, counts by key key by key."""
        def total(f) -> int | dict:
            values = [getattr(p, f.name) for p in parts]
            if f.default_factory is dict:
                return dict(sum((Counter(v) for v in values), Counter()))
            return sum(values)

        return cls(**{f.name: total(f) for f in fields(cls)})


class EngineError(Exception):
    """Base of the engine's errors."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt plus max_tokens can't fit the context (or, with kv_pool, the whole KV pool)."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, limit: int, kv_pool: bool = False):
        if kv_pool:
            message = (f"The request needs {num_prompt_tokens + (max_tokens or 0)} tokens of KV cache, more than "
                       f"the whole pool holds ({limit} tokens). Please raise --kv-cache-memory or shorten the "
                       "request.")
        elif max_tokens is None:
            message = (f"This model's maximum context length is {limit} tokens. However, your prompt resulted "
                       f"in {num_prompt_tokens} tokens, leaving no room for the completion. Please reduce the "
                       "length of the prompt.")
        else:
            message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                       "in the completion). Please reduce the length of the prompt or completion.")
        super().__init__(message)


class InvalidPromptError(EngineError, ValueError):
    """The prompt itself is unusable (empty, or token ids outside the vocabulary)."""


class GrammarError(EngineError, ValueError):
    """The grammar does not compile (a bad schema, regex or Lark text), breaks one of the
    grammar engine's limits, or is too slow to follow."""


class AdapterError(EngineError, ValueError):
    """A LoRA adapter can't be loaded: its name is taken, its files are missing or broken,
    or it doesn't fit the base model (the message says which)."""


class AdapterNotFoundError(EngineError, LookupError):
    """No adapter of that name is loaded (or adapters are off)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"no LoRA adapter named {name!r} is loaded" +
                         (f"; loaded: {', '.join(sorted(known))}" if known else ""))
        self.name = name


class RequestFailedError(EngineError):
    """Processing this one request failed; the engine goes on serving the others."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id


class EngineDeadError(EngineError):
    """The step loop stopped; no request can be served."""
