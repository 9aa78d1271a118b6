"""POST /tokenize and /detokenize, GET /tokenizer_info (ours, as vLLM's)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gptserve.server.protocol.base import OpenAIModel, OpenAIRequest, invalid
from gptserve.server.protocol.messages import ChatMessage


class TokenizeRequest(OpenAIRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # vLLM's: add the tokenizer's BOS/EOS; GPT-2's tokenizer adds none
    # ours, tiktoken's name: special tokens written in `prompt` that become their own token
    # ("all", or names such as "<|endoftext|>"); by default every one stays plain text
    allowed_special: Literal["all"] | list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give exactly one of 'prompt' and 'messages'", "prompt")
        return self


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class TokenizerInfoResponse(OpenAIModel):
    """The tokenizer as transformers' tokenizer_config.json describes it (vLLM's answer);
    lm-evaluation-harness's remote tokenizer reads eos_token, bos_token, pad_token and
    chat_template from it."""

    tokenizer_class: str = "GPT2Tokenizer"
    eos_token: str
    eos_token_id: int  # ours: the ids too, so that no client has to tokenize the names
    bos_token: str
    bos_token_id: int
    unk_token: str
    pad_token: str | None = None  # GPT-2 has none
    add_bos_token: bool = False
    model_max_length: int  # the served context length (--max-model-len)
    vocab_size: int  # ours
    chat_template: str  # the Jinja source the server renders chats with
