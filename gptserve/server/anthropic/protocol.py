"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the wire.

Field names and defaults are Anthropic's (the `anthropic` SDK's types are the reference).
A text-only GPT-2 reads text, tool_use and tool_result blocks; any other block type
(image, document, thinking, ...) and the features behind them (`thinking`,
`output_config.format`, server tools, MCP servers, containers) are refused by name rather
than silently ignored; other unknown fields are ignored. What the API answers (a message,
a token count, an error, the stream's events) is in answers.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.protocol.base import (TEXT_ONLY, OpenAIRequest, Refused, RequestBody, invalid, refuse_non_text,
                                           unsupported)
from gptserve.server.protocol.structured import NAME_PATTERN, check_tool_names_unique

# the block types each role may send
BLOCK_TYPES = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}
NO_SERVER_TOOLS = "this server runs no tools of its own"


# --- content blocks (in requests, and text and tool_use in answers) ----------------------------------------------

class TextBlock(OpenAIRequest):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(OpenAIRequest):
    type: Literal["tool_use"] = "tool_use"
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


def _string_or_blocks(value: Any) -> str:
    return "str" if isinstance(value, str) else "list[blocks]"


# A string or a list of blocks: the value's type picks the branch, so that an error names
# what is wrong in the blocks, not also that they are not a string. (The tags are written
# as pydantic names union members, which errors.param_from_loc leaves out of a param; a
# block's type stays in it, as in Anthropic's own errors: messages[0].content[0].text.text)
TextContent = Annotated[Annotated[str, Tag("str")] | Annotated[list[TextBlock], Tag("list[blocks]")],
                        Discriminator(_string_or_blocks)]


def _text_blocks(content: Any, what: str) -> Any:
    """A list of blocks must be text blocks; anything else is refused by its type."""
    if isinstance(content, list):
        refuse_non_text(content, f"{what} block", "send text blocks")
    return content


class ToolResultBlock(OpenAIRequest):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str = Field(min_length=1)
    content: TextContent | None = None
    is_error: bool | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _text_blocks(content, "tool_result content")

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]
MessageContent = Annotated[Annotated[str, Tag("str")] | Annotated[list[Block], Tag("list[blocks]")],
                           Discriminator(_string_or_blocks)]


class AnthropicMessage(OpenAIRequest):
    role: Literal["user", "assistant"]
    content: MessageContent

    @model_validator(mode="before")
    @classmethod
    def _blocks_of_its_role(cls, data: Any) -> Any:
        role = data.get("role") if isinstance(data, dict) else None
        if not isinstance(role, str) or role not in BLOCK_TYPES or not isinstance(data.get("content"), list):
            return data  # pydantic words what is wrong
        allowed = BLOCK_TYPES[role]
        for i, block in enumerate(data["content"]):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind is None:
                raise invalid(f"content block {i} must be an object with a 'type'")
            if kind in ("text", "tool_use", "tool_result") and kind not in allowed:
                raise invalid(f"a {role} message can't carry a {kind} block (content block {i})")
            if kind not in allowed:
                raise unsupported(f"content block type '{kind}'", f"{TEXT_ONLY}; send text, tool_use and tool_result "
                                                                  "blocks")
        return data

    @property
    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        return [TextBlock(text=self.content)] if isinstance(self.content, str) else list(self.content)


# --- tools ------------------------------------------------------------------------------

class AnthropicTool(OpenAIRequest):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any]  # a JSON Schema of type "object"

    @model_validator(mode="before")
    @classmethod
    def _custom_tools_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise unsupported(f"tool type '{data['type']}'", "only custom tools (name, description, input_schema) "
                                                            "are served")
        return data

    @field_validator("input_schema")
    @classmethod
    def _an_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise invalid("input_schema must be a JSON Schema of type 'object'")
        return schema


class AnthropicToolChoice(OpenAIRequest):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # the tool, with type "tool"
    disable_parallel_tool_use: bool | None = None  # true: at most one tool_use block

    @model_validator(mode="after")
    def _name_with_tool(self) -> "AnthropicToolChoice":
        if (self.type == "tool") != (self.name is not None):
            raise invalid("tool_choice takes a name with type 'tool', and only then", "tool_choice.name")
        return self


# --- requests ---------------------------------------------------------------------------

class ConversationRequest(RequestBody):
    """What creating a message and counting its tokens share: the prompt and the tools."""

    model: str
    system: TextContent | None = None
    messages: list[AnthropicMessage] = Field(json_schema_extra={"minItems": 1})  # checked in _coherent
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    # Anthropic features this server can't honour, refused by name when set
    thinking: dict[str, Any] | None = None  # {"type": "disabled"} is accepted
    output_config: dict[str, Any] | None = None  # "effort" is ignored; "format" is refused
    mcp_servers: Any = None
    container: Any = None
    REFUSED = {
        "thinking": Refused("'thinking'", "GPT-2 has no extended thinking",
                            asks=lambda value: isinstance(value, dict) and value.get("type") != "disabled"),
        "output_config": Refused("'output_config.format'", "use tools with tool_choice 'tool' for JSON output",
                                 asks=lambda value: isinstance(value, dict) and value.get("format") is not None),
        "mcp_servers": Refused("'mcp_servers'", NO_SERVER_TOOLS),
        "container": Refused("'container'", NO_SERVER_TOOLS),
    }

    @field_validator("system", mode="before")
    @classmethod
    def _system_text_only(cls, system: Any) -> Any:
        return _text_blocks(system, "system")

    @model_validator(mode="after")
    def _coherent(self) -> "ConversationRequest":
        if not self.messages:
            raise invalid("messages must contain at least one message", "messages")
        check_tool_names_unique([t.name for t in self.tools or []])
        for i, message in enumerate(self.messages):
            previous = self.messages[i - 1].blocks if i else []
            calls = {b.id for b in previous if isinstance(b, ToolUseBlock)}
            for j, block in enumerate(message.blocks):
                if isinstance(block, ToolResultBlock) and block.tool_use_id not in calls:
                    raise invalid(f"tool_result block's tool_use_id '{block.tool_use_id}' matches no tool_use "
                                  "block of the previous (assistant) message",
                                  f"messages[{i}].content[{j}].tool_use_id")
        return self

    @property
    def prefilled(self) -> bool:
        """The conversation ends with the assistant's text: the answer continues it (a prefill)."""
        last = self.messages[-1]
        return last.role == "assistant" and not any(isinstance(b, ToolUseBlock) for b in last.blocks)

    @property
    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "\n".join(block.text for block in self.system)


class AnthropicMetadata(OpenAIRequest):
    user_id: str | None = None


class MessagesRequest(ConversationRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic's; at most --max-tokens-limit
    temperature: float | None = Field(None, ge=0, le=1)  # Anthropic's range; default 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # 0: off
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    metadata: AnthropicMetadata | None = None
    ignore_eos: bool | None = False  # ours: generate past <|endoftext|> (benchmarks)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop_sequences or [])

    def to_sampling_params(self, extra_stop: list[str], grammar: str | None) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                              stop=self.stop_strings + extra_stop, grammar=grammar,
                              ignore_eos=bool(self.ignore_eos))


class CountTokensRequest(ConversationRequest):
    pass
