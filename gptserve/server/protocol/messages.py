"""A chat message, as chat completions' `messages` carry it: the one form of a conversation
every API family's turn is translated to before the chat template renders it."""
from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from gptserve.server.protocol.base import OpenAIRequest, documented, invalid, refuse_non_text
from gptserve.server.protocol.structured import ToolCallInMessage

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatMessage(OpenAIRequest):
    role: str = documented(..., enum=list(CHAT_ROLES))
    content: str | list[dict[str, Any]] | None = documented(  # a string, or a list of text parts
        anyOf=[{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}])
    name: str | None = None
    tool_calls: list[ToolCallInMessage] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
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
        refuse_non_text(content, "content part", "send {\"type\": \"text\", \"text\": ...}")
        for i, part in enumerate(content):
            if not isinstance(part.get("text"), str):
                raise invalid(f"content part {i} of type 'text' needs a string 'text'")
        return content

    @model_validator(mode="after")
    def _tool_fields_in_their_roles(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise invalid(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.role == "tool" and not self.tool_call_id:
            raise invalid("a tool message needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str:
        """The content as one string; text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)
