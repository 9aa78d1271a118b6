"""A request's output constraints as one grammar for the engine, and tool calls read back.

`response_format` (text, json_object, json_schema), our `structured_outputs` (json,
regex, choice, grammar) and `tools` with `tool_choice` all become one grammar in
llguidance's format (SamplingParams.grammar); the engine only masks logits with it.
A tool call is written as the default chat template teaches:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

With `tool_choice` "required" or a named function the grammar allows only calls of the
allowed tools, each one's arguments held to its `parameters` schema (objects that list
their properties take no others unless they say so, as in vLLM); with "auto" it allows
either such calls or text whose first non-blank character is not "<" (so text can't be a
broken call).
Bad input (a schema that is not JSON Schema, one the grammar engine can't compile, a
regex or Lark grammar that does not compile, a tool_choice naming an unknown tool) is a
400 naming the parameter, before anything is generated.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance

from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol import (FunctionCall, NamedToolChoice, ResponseFormat, StructuredOutputs, Tool,
                                      ToolCall, ToolCallDelta)
from gptserve.server.protocol.responses import TextFormat
from gptserve.server.protocol.structured import FunctionCallDelta

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANY_JSON_OBJECT = {"type": "object"}
# JSON written one way, as json.dumps writes it: free whitespace lets a small model wander
# in blanks until max_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def closed_objects(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, unless it
    says otherwise (as vLLM's default): a small model let loose on extra keys invents them
    until max_tokens."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _checked(grammar: str, param: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"{param} can't be compiled to a grammar: {error}", param=param)
    return grammar


def _check_schema(schema: dict, what: str, param: str) -> None:
    """400 naming `param` unless `schema` is a valid JSON Schema (`what` says whose it is)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidRequestError(f"{what} is not a valid JSON Schema: {e.message}", param=param) from None


def _schema_grammar(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    _check_schema(schema, param, param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), overrides=JSON_LAYOUT)
    except ValueError as e:
        raise InvalidRequestError(f"{param} can't be compiled to a grammar: {e}", param=param) from None
    return _checked(grammar, param)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def format_grammar(response_format: ResponseFormat | None,
                   structured: StructuredOutputs | None) -> tuple[str | None, str]:
    """The grammar of `response_format` or `structured_outputs` (at most one may be given),
    and the field it came from (for the engine's errors about it)."""
    if response_format is not None and structured is not None and response_format.type != "text":
        raise InvalidRequestError("give response_format or structured_outputs, not both", param="structured_outputs")
    if structured is not None:
        return _structured_grammar(structured), "structured_outputs"
    if response_format is None or response_format.type == "text":
        return None, "response_format"
    if response_format.type == "json_object":
        return _schema_grammar(ANY_JSON_OBJECT, "response_format"), "response_format"
    return (_schema_grammar(response_format.json_schema.schema_, "response_format.json_schema.schema"),
            "response_format")


def text_format_grammar(text_format: TextFormat | None) -> str | None:
    """The grammar of the Responses API's `text.format`."""
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return _schema_grammar(ANY_JSON_OBJECT, "text.format")
    return _schema_grammar(text_format.schema_, "text.format.schema")


def _structured_grammar(structured: StructuredOutputs) -> str:
    if structured.json_ is not None:
        return _schema_grammar(structured.json_, "structured_outputs.json")
    if structured.regex is not None:
        return _checked(llguidance.LLMatcher.grammar_from_regex(structured.regex), "structured_outputs.regex")
    if structured.choice is not None:
        lark = "start: " + " | ".join(_lark_string(c) for c in structured.choice)
        return _checked(llguidance.LLMatcher.grammar_from_lark(lark), "structured_outputs.choice")
    return _checked(llguidance.LLMatcher.grammar_from_lark(structured.grammar), "structured_outputs.grammar")


@dataclass
class ToolPlan:
    """What the tools of a request allow: the grammar, and whether calls are possible."""

    tools: list[Tool]
    choice: str  # "none" | "auto" | "required" | a function's name
    parallel: bool
    grammar: str | None = None

    @property
    def may_call(self) -> bool:
        return self.choice != "none" and bool(self.tools)


def tool_plan(tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None,
              parallel_tool_calls: bool | None) -> ToolPlan | None:
    """None when no tools are offered; else the grammar their choice allows."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    choice = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else (tool_choice or "auto")
    if isinstance(tool_choice, NamedToolChoice) and choice not in names:
        raise InvalidRequestError(f"tool_choice names '{choice}', which is not one of the tools ({', '.join(names)})",
                                  param="tool_choice")
    plan = ToolPlan(tools, choice, parallel_tool_calls is not False)
    if choice == "none":
        return plan
    allowed = [t for t in tools if choice in ("auto", "required") or t.function.name == choice]
    variants = []
    for tool in allowed:
        parameters = tool.function.parameters or NO_ARGUMENTS
        _check_schema(parameters, f"the parameters of tool '{tool.function.name}'",
                      f"tools[{names.index(tool.function.name)}]")
        variants.append({"type": "object", "properties": {"name": {"const": tool.function.name},
                                                          "arguments": closed_objects(parameters)},
                         "required": ["name", "arguments"], "additionalProperties": False})
    call_schema = json.dumps({**(variants[0] if len(variants) == 1 else {"anyOf": variants}),
                              "x-guidance": JSON_LAYOUT})
    more = ' ("\\n" call)*' if plan.parallel else ""
    lark = (f"start: {'calls | TEXT' if choice == 'auto' else 'calls'}\n"
            f'calls: " "? call{more}\n'  # GPT-2 likes a space after "Assistant:"
            f"call: {_lark_string(CALL_OPEN)} body {_lark_string(CALL_CLOSE)}\n"
            f"body: %json {call_schema}\n"
            "TEXT: /\\s*[^<\\s][\\s\\S]*/\n")  # text: whatever does not begin like a call
    plan.grammar = _checked(llguidance.LLMatcher.grammar_from_lark(lark), "tools")
    return plan


_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished answer: calls only where they are allowed and
    the text holds well-formed ones; otherwise all of it is content."""
    if plan is None or not plan.may_call or not text.lstrip().startswith(CALL_OPEN):
        return text, []
    calls = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
            calls.append(ToolCall(id=new_call_id(), function=FunctionCall(
                name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False))))
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []  # cut short (finish_reason length): not a call
    return (None, calls) if calls else (text, [])


class ToolCallStream:
    """Streamed text to OpenAI's tool-call deltas, for one choice: each call goes out when
    its closing tag arrives, as one delta with its id and name, then one with its
    arguments; text that is not a call goes out as content."""

    def __init__(self, plan: ToolPlan | None):
        self.plan = plan
        self.buffer = ""
        self.mode: str | None = None if plan is not None and plan.may_call else "text"
        self.num_calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content, tool-call deltas) to send for this piece of text."""
        if self.mode == "text":
            return text, []
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or CALL_OPEN.startswith(head[:len(CALL_OPEN)]) and len(head) < len(CALL_OPEN):
                return "", []  # can't tell yet
            self.mode = "calls" if head.startswith(CALL_OPEN) else "text"
            if self.mode == "text":
                out, self.buffer = self.buffer, ""
                return out, []
        deltas = []
        while (m := _CALL.search(self.buffer)) is not None:
            self.buffer = self.buffer[m.end():]
            try:
                call = json.loads(m.group(1))
                name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            deltas.append(ToolCallDelta(index=self.num_calls, id=new_call_id(), type="function",
                                        function=FunctionCallDelta(name=name, arguments="")))
            deltas.append(ToolCallDelta(index=self.num_calls, function=FunctionCallDelta(arguments=arguments)))
            self.num_calls += 1
        return "", deltas

    def finish(self) -> str:
        """Text held back that turned out not to be a call (content, at the end)."""
        if self.mode == "calls" or not self.buffer:
            return ""
        out, self.buffer = self.buffer, ""
        return out
