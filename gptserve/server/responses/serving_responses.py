"""POST /v1/responses and the stored responses: OpenAI's Responses API over one chat turn.

A request's items (after those of the conversation it continues, `previous_response_id`,
read from the store) become chat messages, `instructions` a system message first; the
turn runs as a chat completion does (chat_turn.open_chat: the same template, tool
grammar and output formats). The answer's output is a `message` with one `output_text`,
or one `function_call` item per call. A stream is OpenAI's semantic events, numbered by
`sequence_number` (events.py). With `store` (the default) the response and its input
items are kept in the ResponseStore (store.py); `--no-store` keeps nothing.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from gptserve.config import ServerConfig
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.chat_turn import open_chat
from gptserve.server.errors import InvalidRequestError, NotFoundError
from gptserve.server.generation import Generation, collect, usage_of
from gptserve.server.protocol.messages import ChatMessage
from gptserve.server.protocol.structured import (FunctionCallInMessage, NamedFunction, NamedToolChoice, Tool,
                                                 ToolCallInMessage)
from gptserve.server.responses.answers import InputItemList, ResponseDeleted, ResponseObject
from gptserve.server.responses.events import OutputWriter, ResponseStream, finished, new_id, output_items
from gptserve.server.responses.protocol import ResponsesRequest, TextFormat, content_text
from gptserve.server.responses.store import ConversationBrokenError, ResponseStore
from gptserve.server.serving import LimitedSettings, ServingContext
from gptserve.server.structured import ANY_JSON_OBJECT, ToolPlan, schema_grammar, tool_plan

ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def response_not_found(response_id: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param=param)


async def text_format_grammar(text_format: TextFormat | None, config: ServerConfig) -> str | None:
    """The grammar of the request's `text.format`."""
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return await schema_grammar(ANY_JSON_OBJECT, "text.format", config)
    return await schema_grammar(text_format.schema_, "text.format.schema", config)


class ServingResponses:
    def __init__(self, ctx: ServingContext | None, store: ResponseStore | None):
        """`ctx`: the model that answers (None where only stored responses are read)."""
        self.ctx, self.store = ctx, store

    async def create(self, req: ResponsesRequest, request: Request) -> Response:
        ctx = self.ctx
        logprobs = (req.top_logprobs or 0) if req.wants_logprobs else None
        ctx.admit(req.model, LimitedSettings(max_tokens=req.max_output_tokens, max_tokens_param="max_output_tokens",
                                             logprobs=logprobs, logprobs_param="top_logprobs"))
        items = stored_items(req.input)
        conversation = await self._conversation(req.previous_response_id) + items
        plan = await tool_plan(self._tools(req), self._tool_choice(req), req.parallel_tool_calls, ctx.config)
        text_format = await text_format_grammar(req.text.format if req.text else None, ctx.config)

        def sampling(stop: list[str], grammar: str | None) -> SamplingParams:
            return SamplingParams(max_tokens=req.max_output_tokens, logprobs=logprobs, stop=stop, grammar=grammar,
                                  ignore_eos=bool(req.ignore_eos),
                                  temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p)

        response = self._response(req, new_id("resp"))
        generation = open_chat(ctx, chat_messages(req.instructions, conversation), plan, text_format, "text.format",
                               sampling, response.id, req.model, prompt_param="input")
        writer = OutputWriter(ctx.tokenizer, plan, req.wants_logprobs)
        stream = ResponseStream(response, generation, writer, lambda r: self._finish(r, items))
        return await ctx.respond(request, generation, bool(req.stream), stream.events,
                                 lambda: self._complete(response, generation, plan, writer, items),
                                 stream_format=stream.format)

    async def _conversation(self, previous_response_id: str | None) -> list[dict[str, Any]]:
        if previous_response_id is None:
            return []
        if self.store is None:
            raise InvalidRequestError("previous_response_id needs stored responses, and this server stores none "
                                      "(--no-store); send the whole conversation as input",
                                      param="previous_response_id")
        try:
            items = await self.store.conversation(previous_response_id)
        except ConversationBrokenError as e:
            raise NotFoundError(f"Response with id '{e.response_id}', earlier in the conversation of "
                                f"'{previous_response_id}', no longer exists.", param="previous_response_id") from None
        if items is None:
            raise response_not_found(previous_response_id, "previous_response_id")
        return items

    @staticmethod
    def _tools(req: ResponsesRequest) -> list[Tool] | None:
        if req.tools is None:
            return None
        return [Tool(type="function", function=tool) for tool in req.tools]

    @staticmethod
    def _tool_choice(req: ResponsesRequest) -> str | NamedToolChoice | None:
        choice = req.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        return NamedToolChoice(type="function", function=NamedFunction(name=choice.name))

    def _response(self, req: ResponsesRequest, response_id: str) -> ResponseObject:
        """The response as it starts: the request's settings, no output yet."""
        tool_choice = req.tool_choice or "auto"
        text_format = req.text.format if req.text and req.text.format else None
        return ResponseObject(
            id=response_id, created_at=int(time.time()), status="in_progress", model=self.ctx.model_name(req.model),
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, max_tool_calls=req.max_tool_calls,
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
            store=bool(req.store) and self.store is not None, temperature=req.temperature, top_p=req.top_p,
            text={"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format else
                  {"type": "text"}},
            tool_choice=tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            tools=[t.model_dump() for t in req.tools or []], top_logprobs=req.top_logprobs, user=req.user,
            metadata=req.metadata or {}, service_tier=req.service_tier, prompt_cache_key=req.prompt_cache_key,
            safety_identifier=req.safety_identifier)

    async def _complete(self, response: ResponseObject, generation: Generation, plan: ToolPlan | None,
                        writer: OutputWriter, items: list[dict[str, Any]]) -> ResponseObject:
        [result] = await collect(generation)
        choice = result.choices[0]
        response.output = output_items(choice, plan, writer)
        finished(response, choice.finish_reason, usage_of([result]))
        return await self._finish(response, items)

    async def _finish(self, response: ResponseObject, items: list[dict[str, Any]]) -> ResponseObject:
        """Stores a finished response (when asked to) before anyone hears of it."""
        if response.store and self.store is not None:
            await self.store.put(response.model_dump(), items)
        return response

    # --- the stored responses ---

    async def _stored(self, response_id: str):
        stored = await self.store.get(response_id) if self.store is not None else None
        if stored is None:
            raise response_not_found(response_id)
        return stored

    async def retrieve(self, response_id: str) -> ResponseObject:
        return ResponseObject.model_validate((await self._stored(response_id)).response)

    async def delete(self, response_id: str) -> ResponseDeleted:
        if self.store is None or not await self.store.delete(response_id):
            raise response_not_found(response_id)
        return ResponseDeleted(id=response_id)

    async def input_items(self, response_id: str, after: str | None, limit: int, order: str) -> InputItemList:
        items = (await self._stored(response_id)).input_items
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise InvalidRequestError(f"'{after}' is not an input item of response '{response_id}'",
                                          param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)


def stored_items(request_input: str | list) -> list[dict[str, Any]]:
    """A request's input as the items it stores and input_items lists: each with an id,
    message content as a list of text parts."""
    if isinstance(request_input, str):
        request_input = [{"type": "message", "role": "user", "content": request_input}]
    items = []
    for item in request_input:
        item = item if isinstance(item, dict) else item.model_dump(exclude_none=True)
        item = {**item, "id": item.get("id") or new_id(ID_PREFIXES[item["type"]])}
        if item["type"] == "message":
            part = "output_text" if item["role"] == "assistant" else "input_text"
            if isinstance(item["content"], str):
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        items.append(item)
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[ChatMessage]:
    """A conversation's items as chat messages: consecutive function calls are one assistant
    turn's tool_calls, each output a tool message answering its call."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    calls: set[str] = set()
    for item in items:
        if item["type"] == "message":
            messages.append(ChatMessage(role=item["role"], content=content_text(item["content"])))
        elif item["type"] == "function_call":
            call = ToolCallInMessage(id=item["call_id"], function=FunctionCallInMessage(
                name=item["name"], arguments=item["arguments"]))
            calls.add(call.id)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                last.tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        else:
            if item["call_id"] not in calls:
                raise InvalidRequestError(f"No tool call found for function call output with call_id "
                                          f"{item['call_id']}.", param="input")
            messages.append(ChatMessage(role="tool", tool_call_id=item["call_id"],
                                        content=content_text(item["output"])))
    if not messages:
        raise InvalidRequestError("input must not be empty", param="input")
    return messages
