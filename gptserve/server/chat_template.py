"""Chat messages to one prompt string, with Jinja templates in the style of transformers'.

A template sees what transformers' `apply_chat_template` gives one: `messages` (dicts
with `role`, `content` as a string, and where given `name`, `tool_calls` with each call's
`function.arguments` as an object, and `tool_call_id`), `tools` (the request's tools, as
OpenAI writes them, or None), `add_generation_prompt`, `bos_token`, `eos_token` and
`raise_exception(msg)`. So a fine-tuned model's own template works with `--chat-template`.
GPT-2 was never chat-tuned, so the default template writes role-labelled turns
("User: ...") and ends with the assistant's cue; the next user cue is then an implicit
stop string, or the model would write the user's turn too. With tools it lists them and
teaches the call format that server/structured.py constrains and parses.
`--chat-template FILE` replaces it (and its implicit stop).
"""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol.messages import ChatMessage

DEFAULT_CHAT_TEMPLATE = (
    "{%- set labels = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant',"
    " 'tool': 'Tool', 'function': 'Tool'} -%}"
    "{%- if tools is defined and tools -%}"
    "System: You can call these tools. To call one, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}"
    "</tool_call> and nothing else.{{ '\\n' }}"
    "{%- for tool in tools %}Tool {{ tool['function']['name'] }}: {{ tool['function'] | tojson }}\n{% endfor -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ labels[message['role']] }}: "
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] %} <tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>{% endfor -%}"
    "{%- else %} {{ message['content'] }}{% endif -%}"
    "{%- if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}Assistant:{% endif -%}"
)
DEFAULT_STOP = ["\nUser:"]


class ChatTemplateError(ValueError):
    """The --chat-template can't be read or compiled (a start-up error, not a request's)."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, stop: list[str], bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from None
        self.source = source  # the Jinja text, for clients that render chats themselves (/tokenizer_info)
        self.stop = stop  # implicit stop strings of this template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.uses_eos_token = "eos_token" in source or "bos_token" in source  # GPT-2: both <|endoftext|>

    @classmethod
    def load(cls, spec: str | None, bos_token: str, eos_token: str) -> "ChatTemplate":
        """The default template, or `spec`: a file path, or the template text itself."""
        if spec is None:
            return cls(DEFAULT_CHAT_TEMPLATE, DEFAULT_STOP, bos_token, eos_token)
        path = Path(spec).expanduser()
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), [], bos_token, eos_token)
        if "{{" in spec or "{%" in spec:
            return cls(spec, [], bos_token, eos_token)
        raise ChatTemplateError(f"chat template file {spec!r} does not exist")

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        try:
            return self.template.render(messages=[_turn(m) for m in messages], tools=tools or None,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None


def _turn(message: ChatMessage) -> dict:
    """A message as chat templates read it (transformers' conventions)."""
    turn: dict = {"role": message.role, "content": message.text}
    if message.name:
        turn["name"] = message.name
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                              for c in message.tool_calls]
    return turn


def _arguments(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # as the caller sent it
