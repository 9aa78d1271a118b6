"""Per-request sampling settings, validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: logits divided by them overflow float32 (vLLM's bound)


class InvalidSamplingParams(ValueError):
    """A sampling setting is out of range; `param` names it (OpenAI's field name)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context limit; 0 (with prompt_logprobs): score the prompt only
    temperature: float = 1.0  # 0 (anything under GREEDY_BELOW) is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob and k alternatives
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (completions' echo)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    grammar: str | None = None  # llguidance's grammar format (engine/grammar.py): output must match it
    adapter: str | None = None  # the LoRA adapter that generates (engine/lora.py); None: the base model
    token_details: bool = False  # each token's TokenDetail (the grammar's mask, speculative guesses)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidSamplingParams(msg, param)

        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}", "n")
        fewest = 0 if self.prompt_logprobs else 1  # 0 generates nothing: it only serves to score the prompt
        if self.max_tokens is not None and self.max_tokens < fewest:
            bad(f"max_tokens must be at least {fewest}, got {self.max_tokens}", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            bad(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            bad(f"top_k must be -1, 0 (off) or positive, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}", "repetition_penalty")
        for tok, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                bad(f"logit_bias for token {tok} must be in [-100, 100], got {bias}", "logit_bias")
        if self.logprobs is not None and self.logprobs < 0:  # the upper bound is the server's (--max-top-logprobs)
            bad(f"top_logprobs must be at least 0, got {self.logprobs}", "top_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
