"""A request's output constraints as one grammar for the engine, and tool calls read back.

`response_format` (text, json_object, json_schema), our `structured_outputs` (json,
regex, choice, grammar) and `tools` with `tool_choice` all become one grammar in
llguidance's format (SamplingParams.grammar); the engine only masks logits with it.
A tool call is written as the default chat template teaches:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

With `tool_choice` "required" or a named function the grammar allows only calls of the
allowed tools, each one's arguments held to its `parameters` schema; with "auto" it allows
either such calls or text whose first non-blank character is not "<" (so text can't be a
broken call). Schemas are rewritten first (schema_rewrite.py): objects closed, numbers
bounded.
Bad input (a schema that is not JSON Schema, one the grammar engine can't compile, a
regex or Lark grammar that does not compile, a tool_choice naming an unknown tool) and
input past the server's limits (structured_limits.py) is a 400 naming the parameter,
before anything is generated. Checking and compiling a large grammar takes seconds, so
`format_grammar`, `schema_grammar` and `tool_plan` do it on the grammar threads
(grammar_threads.py), never on the event loop, and only when there is a grammar.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import jsonschema_rs
import llguidance

from gptserve.config import ServerConfig
from gptserve.grammar_limits import PARSER_LIMITS, describe
from gptserve.grammar_threads import run_deep
from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol.structured import (FunctionCall, FunctionCallDelta, NamedToolChoice, ResponseFormat,
                                                 StructuredOutputs, Tool, ToolCall, ToolCallDelta)
from gptserve.server.schema_rewrite import prepare_schema, rebase_refs
from gptserve.server.structured_limits import (check_choices, check_lark, check_regex, check_schema_shape,
                                               check_tool_count, check_tools_size)

T = TypeVar("T")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANY_JSON_OBJECT = {"type": "object"}
# JSON written one way, as json.dumps writes it: free whitespace lets a small model wander
# in blanks until max_tokens
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# the dialects the meta-schema check knows; another $schema is read as the latest, never fetched
KNOWN_DIALECT = re.compile(r"^https?://json-schema\.org/(draft-0[4-7]/schema|draft/20(19-09|20-12)/schema)#?$")
REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$#&\-~])")  # what the regex crate (llguidance's syntax) escapes


async def _off_loop(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a grammar thread: checks and compiles that may take seconds."""
    return await asyncio.wrap_future(run_deep(fn, *args))


def _checked(grammar: str, param: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=PARSER_LIMITS)
    if error:
        raise InvalidRequestError(f"{param} can't be compiled to a grammar: {describe(error)}", param=param)
    return grammar


def _check_schema(schema: Any, what: str, param: str) -> None:
    """400 naming `param` unless `schema` is a valid JSON Schema (`what` says whose it is)."""
    if isinstance(schema, dict) and "$schema" in schema and not KNOWN_DIALECT.match(str(schema["$schema"])):
        schema = {k: v for k, v in schema.items() if k != "$schema"}
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as e:
        where = "/".join(map(str, e.instance_path))
        at = f" (at /{where})" if where else ""
        raise InvalidRequestError(f"{what} is not a valid JSON Schema: {e.message}{at}", param=param) from None
    except (jsonschema_rs.ReferencingError, ValueError, TypeError, OverflowError) as e:
        raise InvalidRequestError(f"{what} is not a valid JSON Schema: {e}", param=param) from None


def _schema_grammar(schema: Any, param: str, config: ServerConfig) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    check_schema_shape(schema, param, config)
    _check_schema(schema, param, param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(prepare_schema(schema, config.json_number_bounds),
                                                                overrides=JSON_LAYOUT)
    except ValueError as e:
        raise InvalidRequestError(f"{param} can't be compiled to a grammar: {e}", param=param) from None
    return _checked(grammar, param)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _regex_literal(text: str) -> str:
    return REGEX_SPECIAL.sub(r"\\\1", text)


async def schema_grammar(schema: Any, param: str, config: ServerConfig) -> str:
    """The grammar of a JSON Schema (an object, or its JSON text) that the request's field
    `param` gave; a 400 naming `param` when it is not one, or can't be compiled."""
    return await _off_loop(_schema_grammar, schema, param, config)


async def format_grammar(response_format: ResponseFormat | None, structured: StructuredOutputs | None,
                         config: ServerConfig) -> tuple[str | None, str]:
    """The grammar of `response_format` or `structured_outputs` (at most one may be given),
    and the field it came from (for the engine's errors about it)."""
    if response_format is not None and structured is not None and response_format.type != "text":
        raise InvalidRequestError("give response_format or structured_outputs, not both", param="structured_outputs")
    if structured is not None:
        return await _off_loop(_structured_grammar, structured, config), "structured_outputs"
    if response_format is None or response_format.type == "text":
        return None, "response_format"
    if response_format.type == "json_object":
        return await schema_grammar(ANY_JSON_OBJECT, "response_format", config), "response_format"
    return (await schema_grammar(response_format.json_schema.schema_, "response_format.json_schema.schema", config),
            "response_format")


def _structured_grammar(structured: StructuredOutputs, config: ServerConfig) -> str:
    if structured.json_ is not None:
        return _schema_grammar(structured.json_, "structured_outputs.json", config)
    if structured.regex is not None:
        check_regex(structured.regex, "structured_outputs.regex", config)
        return _checked(llguidance.LLMatcher.grammar_from_regex(structured.regex), "structured_outputs.regex")
    if structured.choice is not None:
        check_choices(structured.choice, config)
        # one alternation, one lexeme: a Lark rule per choice puts them all in one parser row,
        # which llguidance caps (max_items_in_row), and compiles far slower
        regex = "|".join(_regex_literal(c) for c in structured.choice)
        return _checked(llguidance.LLMatcher.grammar_from_regex(regex), "structured_outputs.choice")
    check_lark(structured.grammar, "structured_outputs.grammar", config)
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


async def tool_plan(tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None,
                    parallel_tool_calls: bool | None, config: ServerConfig) -> ToolPlan | None:
    """None when no tools are offered; else the grammar their choice allows."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    check_tool_count(len(tools), config)
    names = [t.function.name for t in tools]
    choice = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else (tool_choice or "auto")
    if isinstance(tool_choice, NamedToolChoice) and choice not in names:
        raise InvalidRequestError(f"tool_choice names '{choice}', which is not one of the tools ({', '.join(names)})",
                                  param="tool_choice")
    plan = ToolPlan(tools, choice, parallel_tool_calls is not False)
    if choice != "none":
        plan.grammar = await _off_loop(_tools_grammar, plan, config)
    return plan


def _tools_grammar(plan: ToolPlan, config: ServerConfig) -> str:
    names = [t.function.name for t in plan.tools]
    allowed = [t for t in plan.tools if plan.choice in ("auto", "required") or t.function.name == plan.choice]
    params = [(tool.function.parameters or NO_ARGUMENTS, f"tools[{names.index(tool.function.name)}]")
              for tool in allowed]
    check_tools_size([check_schema_shape(schema, param, config) for schema, param in params], config)
    variants = []
    for tool, (parameters, param) in zip(allowed, params):
        _check_schema(parameters, f"the parameters of tool '{tool.function.name}'", param)
        # the arguments' own $refs point into them where they now sit, inside the call's schema
        where = "/properties/arguments" if len(allowed) == 1 else f"/anyOf/{len(variants)}/properties/arguments"
        arguments = rebase_refs(prepare_schema(parameters, config.json_number_bounds), where)
        variants.append({"type": "object", "properties": {"name": {"const": tool.function.name},
                                                          "arguments": arguments},
                         "required": ["name", "arguments"], "additionalProperties": False})
    call_schema = json.dumps({**(variants[0] if len(variants) == 1 else {"anyOf": variants}),
                              "x-guidance": JSON_LAYOUT})
    more = ' ("\\n" call)*' if plan.parallel else ""
    lark = (f"start: {'calls | TEXT' if plan.choice == 'auto' else 'calls'}\n"
            f'calls: " "? call{more}\n'  # GPT-2 likes a space after "Assistant:"
            f"call: {_lark_string(CALL_OPEN)} body {_lark_string(CALL_CLOSE)}\n"
            f"body: %json {call_schema}\n"
            "TEXT: /\\s*[^<\\s][\\s\\S]*/\n")  # text: whatever does not begin like a call
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), "tools")


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
