"""OpenAI's wire format as pydantic models, after vLLM's entrypoints/openai/protocol.py.

Field names and defaults are OpenAI's, so the API is a declaration, not code; our
extensions are marked `# ours`. OpenAI fields a text-only GPT-2 can't honour (tools,
structured output, audio, images) are declared too, so that a request using them is
refused by name rather than silently ignored; any other unknown field is ignored.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from gptserve.engine.sampling_params import InvalidSamplingParams, SamplingParams

# pydantic error kinds that errors.py turns into 400s with our own message and param
UNSUPPORTED = "unsupported_parameter"
INVALID = "invalid_value"


def unsupported(what: str, why: str, param: str | None = None) -> PydanticCustomError:
    """`what` is refused; the error's param is `param`, or else where pydantic found it."""
    return PydanticCustomError(UNSUPPORTED, "{message}",
                               {"message": f"{what} is not supported by this server: {why}", "param": param})


def invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """`param`: for checks across fields (model validators), which have no location of their own."""
    return PydanticCustomError(INVALID, "{message}", {"message": message, "param": param})


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequest(OpenAIModel):
    """A request body, typed as strictly as OpenAI's: "16" is not 16, and false is not 0
    (a completions request with logprobs=false wants none, not zero alternatives)."""

    model_config = ConfigDict(extra="ignore", strict=True)


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

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(OpenAIRequest):
    role: str = documented(..., enum=list(CHAT_ROLES))
    content: str | list[dict[str, Any]] | None = documented(  # a string, or a list of text parts
        anyOf=[{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}])
    name: str | None = None
    tool_calls: Any = None  # refused: no tool calling

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise unsupported(f"role '{role}'", "tool and function calling are not supported")
        if role not in CHAT_ROLES:
            raise invalid(f"role must be one of {', '.join(CHAT_ROLES)}; got '{role}'")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise invalid("content must be a string or a list of content parts")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is None:
                raise invalid(f"content part {i} must be an object with a 'type'")
            if kind != "text":
                raise unsupported(f"content part type '{kind}'",
                                  "this server serves text-only models; send {\"type\": \"text\", \"text\": ...}")
            if not isinstance(part.get("text"), str):
                raise invalid(f"content part {i} of type 'text' needs a string 'text'")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls: Any) -> Any:
        if tool_calls:
            raise unsupported("'tool_calls'", "tool calling is not supported")
        return tool_calls

    @property
    def text(self) -> str:
        """The content as one string; text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = False


class SamplingRequest(OpenAIRequest):
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

    def to_sampling_params(self, extra_stop: list[str] | None = None) -> SamplingParams:
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
        )

    def _token_logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidSamplingParams(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        return bias


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})  # checked in _coherent
    max_tokens: int | None = documented(minimum=1)  # None: up to the context limit
    max_completion_tokens: int | None = documented(minimum=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = documented(minimum=0)  # at most --max-top-logprobs
    # OpenAI features this server can't honour, declared so they are refused by name
    # (documented as the values that are accepted)
    tools: Any = documented(**nullable({"type": "array", "maxItems": 0}))
    tool_choice: Any = documented(**nullable({"const": "none"}))
    functions: Any = documented(**nullable({"type": "array", "maxItems": 0}))
    function_call: Any = documented(**nullable({"const": "none"}))
    response_format: Any = documented(**nullable({"anyOf": [
        {"const": "text"}, {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}]}))
    audio: Any = documented(type="null")
    modalities: Any = documented(**nullable({"const": ["text"]}))
    web_search_options: Any = documented(type="null")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Any, info: Any) -> Any:
        if value is not None and value != []:
            raise unsupported(f"'{info.field_name}'", "tool and function calling are not supported")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: Any) -> Any:
        if value not in (None, "none"):
            raise unsupported(f"'{info.field_name}'", "tool and function calling are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else value
        if value is not None and kind != "text":
            raise unsupported("'response_format'", f"type '{kind}' is not available; only 'text' output is")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _no_audio_or_search(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise unsupported(f"'{info.field_name}'", "this server serves a text-only model")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality_only(cls, value: Any) -> Any:
        if value is not None and value != ["text"]:
            raise unsupported("'modalities'", "only [\"text\"] is available")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise invalid("messages must contain at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput | None = None  # None: "<|endoftext|>", a new document
    max_tokens: int | None = documented(16, minimum=1)
    echo: bool | None = False
    logprobs: int | None = documented(minimum=0)  # the chosen token's logprob and this many alternatives (at most --max-top-logprobs)
    suffix: str | None = None  # refused: no insertion
    best_of: int | None = None  # only best_of == n

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        if prompt is None or isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise invalid("prompt must be a string, a list of strings, a list of token ids "
                          "or a list of lists of token ids, and not empty")
        def token_list(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if all(isinstance(p, str) for p in prompt) or token_list(prompt):
            return prompt
        if all(token_list(p) and p for p in prompt):
            return prompt
        raise invalid("prompt must be a string, a list of strings, a list of token ids "
                      "or a list of non-empty lists of token ids")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise unsupported("'suffix'", "insertion is not supported")
        return suffix

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise unsupported("'best_of'", "only best_of equal to n (every candidate returned) is supported",
                              "best_of")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def wants_prompt_logprobs(self) -> bool:
        return bool(self.echo) and self.logprobs is not None


class TokenizeRequest(OpenAIRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give exactly one of 'prompt' and 'messages'", "prompt")
        return self


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]


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


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIModel):
    """Both the full response and each streamed chunk, as in OpenAI's API."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "gptserve"
    max_model_len: int | None = None  # ours


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(OpenAIModel):
    prompt: str
