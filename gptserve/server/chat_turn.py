"""One chat turn, whatever API family asked for it (chat completions, Responses, Messages):
the conversation as our chat messages and the offered tools through the chat template,
the answer constrained by the tools' grammar or an output format, run as one Generation.
"""
from __future__ import annotations

from typing import Callable

from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.errors import InvalidRequestError
from gptserve.server.generation import Generation
from gptserve.server.protocol.messages import ChatMessage
from gptserve.server.serving import ServingContext
from gptserve.server.structured import ToolPlan


def chat_prompt(ctx: ServingContext, messages: list[ChatMessage], plan: ToolPlan | None,
                add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids: the messages and the offered tools through the chat template."""
    tools = [t.model_dump(exclude_none=True) for t in plan.tools] if plan is not None else None
    return ctx.encode_chat(messages, add_generation_prompt, tools=tools)


def open_chat(ctx: ServingContext, messages: list[ChatMessage], plan: ToolPlan | None, output_format: str | None,
              format_param: str, sampling: Callable[[list[str], str | None], SamplingParams],
              request_id: str, model: str | None, prompt_param: str = "messages",
              add_generation_prompt: bool = True) -> Generation:
    """One chat turn, whatever API asked for it: the messages and the offered tools through
    the chat template, constrained by the tools' grammar when the model may call them, else
    by `output_format` (the grammar of the request's field `format_param`).
    `sampling(extra_stop, grammar)` builds the request's SamplingParams; `prompt_param` is
    the request field that carried the conversation, for errors about it; `model`, the request's
    (which may name a LoRA adapter). Without
    `add_generation_prompt` the answer continues the last (assistant) message."""
    may_call = plan is not None and plan.may_call
    if may_call and output_format is not None:
        raise InvalidRequestError(f"a JSON {format_param} can't be combined with tools the model may call; "
                                  "set tool_choice to 'none' or drop one", param=format_param)
    grammar, grammar_param = (plan.grammar, "tools") if may_call else (output_format, format_param)
    prompt_ids = chat_prompt(ctx, messages, plan, add_generation_prompt)
    # the template's implicit stops end free text; a grammar ends its own output
    free_text = grammar is None or plan is not None and plan.choice == "auto"
    params = sampling(ctx.chat_template.stop if free_text else [], grammar)
    return ctx.open_generation([prompt_ids], params, request_id, model, prompt_param, grammar_param)
