"""Structured outputs and tools on the wire: `response_format`, our `structured_outputs`
(vLLM's shape), `tools` and `tool_choice`, and the tool calls of an answer."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from gptserve.server.protocol.base import OpenAIModel, OpenAIRequest, invalid

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class JsonSchemaFormat(OpenAIRequest):
    name: str = Field("response", pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid("response_format of type 'json_schema' needs a 'json_schema' object",
                          "response_format.json_schema")
        return self


class StructuredOutputs(OpenAIRequest):  # ours, as vLLM's: exactly one of these
    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON Schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, as llguidance reads it

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise invalid("structured_outputs takes exactly one of 'json', 'regex', 'choice' and 'grammar'",
                          "structured_outputs")
        if self.choice is not None and not self.choice:
            raise invalid("structured_outputs.choice must list at least one string", "structured_outputs.choice")
        return self


class FunctionDefinition(OpenAIRequest):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: no arguments
    strict: bool | None = None


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallInMessage(OpenAIRequest):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCallInMessage(OpenAIRequest):
    """An earlier assistant turn's call, sent back in `messages`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallInMessage


# --- in answers -------------------------------------------------------------------------


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


def check_tool_names_unique(names: list[str]) -> None:
    """Tool names, in the order given, must be unique: a 400 naming the second of a pair."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise invalid(f"tool names must be unique; '{name}' is given twice", f"tools[{i}]")
        seen.add(name)


def tool_names_unique(tools: list[Tool]) -> list[Tool]:
    check_tool_names_unique([tool.function.name for tool in tools])
    return tools


__all__ = ["JsonSchemaFormat", "ResponseFormat", "StructuredOutputs", "FunctionDefinition", "Tool",
           "NamedFunction", "NamedToolChoice", "ToolChoice", "ToolCallInMessage", "FunctionCallInMessage",
           "FunctionCall", "ToolCall", "FunctionCallDelta", "ToolCallDelta", "tool_names_unique",
           "check_tool_names_unique"]
