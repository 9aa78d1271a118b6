"""What one engine can serve, and the one check of a request against it.

`EngineLimits` is fixed when the engine is built (context length, vocabulary, KV pool
size) and read by anyone: the server shows it, the engine checks every request with it
in `add_request`. The default of max_tokens, "the rest of the context", is computed here
and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from gptserve.engine.outputs import InvalidPromptError, PromptTooLongError
from gptserve.engine.sampling_params import InvalidSamplingParams, SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int  # prompt plus output, in tokens
    vocab_size: int
    kv_capacity: int  # tokens the whole KV pool holds

    def out_of_vocab(self, token_ids: Iterable[int]) -> int | None:
        """The first token id outside the vocabulary, or None."""
        return next((t for t in token_ids if not 0 <= t < self.vocab_size), None)

    def max_new_tokens(self, num_prompt_tokens: int, params: SamplingParams, cap: int | None = None) -> int:
        """max_tokens, or when unset the rest of the context (at most `cap`)."""
        if params.max_tokens is not None:
            return params.max_tokens
        room = self.max_model_len - num_prompt_tokens
        return room if cap is None else min(room, cap)

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise for a prompt the model can't read: empty, unknown token ids, or longer than
        the context (a prompt to generate from is also checked with room to generate)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidPromptError("the prompt is empty")
        bad = self.out_of_vocab(prompt_token_ids)
        if bad is not None:
            raise InvalidPromptError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if n > self.max_model_len:
            raise PromptTooLongError(n, None, self.max_model_len)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a clear error for a request that can never be served."""
        self.check_prompt(prompt_token_ids)
        n = len(prompt_token_ids)
        bad = self.out_of_vocab(params.logit_bias)
        if bad is not None:
            raise InvalidSamplingParams(
                f"logit_bias token id {bad} is outside the vocabulary [0, {self.vocab_size})", "logit_bias")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise InvalidSamplingParams(f"top_logprobs must be at most the vocabulary size {self.vocab_size}, "
                                        f"got {params.logprobs}", "top_logprobs")
        new = self.max_new_tokens(n, params)
        no_room = new < 1 and params.max_tokens is None  # an explicit 0 asks for no room: it scores the prompt
        if no_room or n + new > self.max_model_len:
            raise PromptTooLongError(n, params.max_tokens, self.max_model_len)
        if n + new > self.kv_capacity:
            raise PromptTooLongError(n, params.max_tokens, self.kv_capacity, kv_pool=True)
