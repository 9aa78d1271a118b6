"""Chat messages to one prompt string, with Jinja templates in the style of transformers'.

A template sees `messages` (dicts with `role` and `content` as a string),
`add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception(msg)`, as in
transformers' `apply_chat_template`. GPT-2 was never chat-tuned, so the default template
writes role-labelled turns ("User: ...") and ends with the assistant's cue; the next
user cue is then an implicit stop string, or the model would write the user's turn too.
`--chat-template FILE` replaces it (and its implicit stop).
"""
from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol import ChatMessage

DEFAULT_CHAT_TEMPLATE = (
    "{%- set labels = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{{ labels[message['role']] }}: {{ message['content'] }}"
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

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        turns = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return self.template.render(messages=turns, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", param="messages") from None
