"""What a client sends to the Responses API (`POST /v1/responses`), with OpenAI's field
names; what it answers is in answers.py.

A request's `input` is a string or a list of items: messages (content a string or
`input_text` / `output_text` parts), `function_call` items (an earlier answer's calls)
and `function_call_output` items (what the caller's tools returned). Items of other
types (images, files, reasoning, built-in tools) are refused by name.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gptserve.server.protocol.base import (INVALID, UNSUPPORTED, OpenAIRequest, Refused, RequestBody, documented,
                                           invalid, unsupported)
from gptserve.server.protocol.structured import NAME_PATTERN, FunctionDefinition, check_tool_names_unique

INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
ITEM_TYPES = ("message", "function_call", "function_call_output")
CONTINUE_BY_ID = "use previous_response_id to continue a conversation"


def _part_texts(content: Any, where: str) -> Any:
    """Checks a content list: text parts only, each with a string `text`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("refusal",):
            continue
        if kind not in TEXT_PARTS:
            raise unsupported(f"content part type '{kind}'", "this server serves text-only models; send "
                              "'input_text' parts", f"{where}[{i}].type")
        if not isinstance(part.get("text"), str):
            raise invalid(f"content part {i} of type '{kind}' needs a string 'text'", f"{where}[{i}].text")
    return content


def content_text(content: str | list[dict[str, Any]]) -> str:
    """Message content as one string: its text parts joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text") or part.get("refusal") or "" for part in content)


class MessageItem(OpenAIRequest):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _part_texts(content, "content")


class FunctionCallItem(OpenAIRequest):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str
    name: str
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(OpenAIRequest):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str
    output: str | list[dict[str, Any]]
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, output: Any) -> Any:
        return _part_texts(output, "output")


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


_INPUT_ITEM: TypeAdapter = TypeAdapter(InputItem)


def _item_error(error: ValidationError, index: int) -> PydanticCustomError:
    """The first complaint about input[index], its param the path into the item."""
    first = error.errors()[0]
    ctx = first.get("ctx") or {}
    inner = ctx.get("param") or "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"][1:])
    param = f"input[{index}]" + (inner if inner.startswith(("[", ".")) else f".{inner}")
    if first["type"] in (UNSUPPORTED, INVALID):
        return PydanticCustomError(first["type"], "{message}", {"message": ctx["message"], "param": param})
    if first["type"] == "missing":
        return invalid(f"input[{index}] is missing its '{first['loc'][-1]}'", param)
    return invalid(f"Invalid value for '{param}': {first['msg']}", param)


class FunctionToolType(OpenAIRequest):
    type: Literal["function"]


# A function tool as the Responses API writes it: its type, then the function's definition,
# flat. (pydantic orders fields from the last base to the first: `type` comes first, as
# the API writes it, and a wrong type is the error named before any other.)
class FunctionTool(FunctionDefinition, FunctionToolType):
    pass


class FunctionToolChoice(OpenAIRequest):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "TextFormat":
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise invalid("text.format of type 'json_schema' needs a 'name' and a 'schema'", "text.format")
        return self


class TextConfig(OpenAIRequest):
    format: TextFormat | None = None
    verbosity: Any = None  # a hint for reasoning models; nothing to do here


class ResponsesRequest(RequestBody):
    model: str | None = None  # None: the served model
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)  # None: up to the context limit
    temperature: float | None = documented(minimum=0, maximum=2)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    top_logprobs: int | None = documented(minimum=0)  # with include ["message.output_text.logprobs"]
    include: list[str] | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None  # default true
    text: TextConfig | None = None
    metadata: dict[str, str] | None = documented(maxProperties=16)
    user: str | None = None
    truncation: Literal["disabled"] | None = documented(const="disabled")
    # accepted and given back, with no effect on a single local model
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    max_tool_calls: int | None = documented(minimum=1)
    ignore_eos: bool | None = False  # ours: generate past <|endoftext|> (benchmarks)
    # what this server can't honour, declared so it is refused by name
    background: bool | None = documented(**{"anyOf": [{"const": False}, {"type": "null"}]})
    reasoning: dict[str, Any] | None = None
    conversation: Any = documented(type="null")
    prompt: Any = documented(type="null")
    REFUSED = {
        "truncation": Refused("truncation 'auto'", "an input longer than the context is refused, not cut",
                              asks=lambda value: value == "auto"),
        "background": Refused("background mode", "responses are generated while the request waits",
                              asks=lambda value: value is True),
        "reasoning": Refused("'reasoning'", "a GPT-2 model does not reason before it answers",
                             asks=lambda value: isinstance(value, dict) and any(v is not None for v in value.values())),
        "conversation": Refused("'conversation'", CONTINUE_BY_ID),
        "prompt": Refused("'prompt'", CONTINUE_BY_ID),
    }

    @field_validator("input", mode="before")
    @classmethod
    def _items_typed(cls, value: Any) -> Any:
        """Each item checked on its own, so that an error names the item and its field.
        Messages may leave out their type (OpenAI's "easy" input messages); other item
        types are refused by name."""
        if not isinstance(value, list):
            return value
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise invalid(f"input[{i}] must be an object", f"input[{i}]")
            kind = item.get("type", "message" if "role" in item else None)
            if kind is None:
                raise invalid(f"input[{i}] needs a 'type' (or a 'role', for a message)", f"input[{i}]")
            if kind not in ITEM_TYPES:
                raise unsupported(f"input item type '{kind}'", f"this server takes {', '.join(ITEM_TYPES)} items",
                                  f"input[{i}].type")
            try:
                items.append(_INPUT_ITEM.validate_python({**item, "type": kind}))
            except ValidationError as e:
                raise _item_error(e, i) from None
        return items

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        if tools is not None:
            check_tool_names_unique([t.name for t in tools])
        return tools

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise invalid("metadata takes at most 16 keys")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise invalid("metadata keys are at most 64 characters long and values 512")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> "ResponsesRequest":
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise invalid("input must not be empty", "input")
        if self.top_logprobs is not None and "message.output_text.logprobs" not in (self.include or []):
            raise invalid("top_logprobs requires include ['message.output_text.logprobs']", "top_logprobs")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])
