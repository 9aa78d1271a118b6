"""What every API family's wire format shares: the base models, the error kinds that
errors.py words, the fields a request refuses by name (`RequestBody.REFUSED`), the
sampling fields of chat and completions, usage, models, errors."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gptserve.engine.sampling_params import InvalidSamplingParams, SamplingParams

# pydantic error kinds that errors.py turns into 400s with our own message and param
UNSUPPORTED = "unsupported_parameter"
INVALID = "invalid_value"
TEXT_ONLY = "this server serves a text-only model"


def unsupported(what: str, why: str, param: str | None = None) -> PydanticCustomError:
    """`what` is refused; the error's param is `param`, or else where pydantic found it."""
    return PydanticCustomError(UNSUPPORTED, "{message}",
                               {"message": f"{what} is not supported by this server: {why}", "param": param})


def invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """`param`: for checks across fields (model validators), which have no location of their own."""
    return PydanticCustomError(INVALID, "{message}", {"message": message, "param": param})


def refuse_non_text(parts: list, what: str, hint: str) -> None:
    """Each of `parts` (content parts, blocks: `what`) must be an object whose type is
    "text"; any other type is refused by name, with `hint` saying what to send."""
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise invalid(f"{what} {i} must be an object with a 'type'")
        if kind != "text":
            raise unsupported(f"{what} type '{kind}'", f"{TEXT_ONLY}; {hint}")


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequest(OpenAIModel):
    """A request body, typed as strictly as OpenAI's: "16" is not 16, and false is not 0
    (a completions request with logprobs=false wants none, not zero alternatives)."""

    model_config = ConfigDict(extra="ignore", strict=True)


def is_set(value: Any) -> bool:
    return value is not None


@dataclass(frozen=True)
class Refused:
    """A field an API declares that this server can't honour: a value that `asks` for the
    feature is refused by name, "`what` is not supported by this server: `why`". `asks`
    sees the value as sent, and asks only of values the field's type takes, so that any
    other value is the type's error, not a refusal."""

    what: str
    why: str
    asks: Callable[[Any], bool] = is_set


class RequestBody(OpenAIRequest):
    """A whole request body: the fields in its REFUSED table are refused when they ask for
    what the server can't do; the error names the field."""

    REFUSED: ClassVar[dict[str, Refused]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        refused = cls.REFUSED.get(info.field_name)
        if refused is not None and refused.asks(value):
            raise unsupported(refused.what, refused.why)
        return value


def documented(default: Any = None, **schema: Any) -> Any:
    """A field whose range or shape the OpenAPI document states, so that clients and fuzzers
    see it; the check itself stays in code (SamplingParams, the validators here), which words
    the error and names the field."""
    return Field(default, json_schema_extra=schema)


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def now() -> int:
    return int(time.time())



# --- requests -------------------------------------------------------------------------

class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class SamplingRequest(RequestBody):
    """What chat and completions requests share: the model and the sampling settings."""

    model: str | None = None  # None: the served model
    n: int | None = documented(1, minimum=1)  # at most --max-n
    temperature: float | None = documented(minimum=0, maximum=2)  # OpenAI's default, 1
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)  # 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = documented(0.0, minimum=-2, maximum=2)
    frequency_penalty: float | None = documented(0.0, minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = documented(  # token id (as a string) -> bias
        **nullable({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}))
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # an int64, as OpenAI's
    user: str | None = None
    top_k: int | None = documented(minimum=-1)  # ours; 0 or -1: off
    min_p: float | None = documented(minimum=0, maximum=1)  # ours
    repetition_penalty: float | None = documented(exclusiveMinimum=0, maximum=10)  # ours; 1: off
    ignore_eos: bool | None = False  # ours: generate past <|endoftext|>

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    # the settings that differ between chat and completions
    def max_new_tokens(self) -> int | None:
        raise NotImplementedError

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    def wants_prompt_logprobs(self) -> bool:
        return False

    def to_sampling_params(self, extra_stop: list[str] | None = None, grammar: str | None = None) -> SamplingParams:
        """Raises InvalidSamplingParams (a 400 naming the field) for out-of-range values; token
        ids (logit_bias) are checked against the vocabulary by the engine."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            max_tokens=self.max_new_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._token_logit_bias(),
            seed=self.seed,
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.wants_prompt_logprobs(),
            stop=self.stop_strings + (extra_stop or []),
            ignore_eos=bool(self.ignore_eos),
            grammar=grammar,
        )

    def _token_logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidSamplingParams(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        return bias


# --- responses ------------------------------------------------------------------------

class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(OpenAIModel):
    """Every error answer, whatever its status."""

    error: ErrorInfo


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "gptserve"
    max_model_len: int | None = None  # ours
    root: str | None = None  # vLLM's: what the model was loaded from (a LoRA adapter's folder)
    parent: str | None = None  # vLLM's: a LoRA adapter's base model
    state: Literal["loaded", "loading", "unloaded"] | None = None  # ours: whether it is in memory now


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
