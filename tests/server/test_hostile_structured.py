"""Hostile structured outputs and tools: schemas nested hundreds deep, thousands wide,
recursive, huge enums and anyOfs; regexes and Lark grammars that are broken, huge, or
whose repetitions explode; thousands of tools; through chat completions, the Responses API
(`text.format`, `tools`) and Anthropic's Messages API (`tools`). Each is refused with a 400
in its API's error shape, naming the field, or served; none is a 5xx, none takes the
server down, and the server serves a plain request after each."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.server.test_errors import assert_error
from tests.server.test_messages import assert_anthropic_error

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def deep_schema(levels: int) -> dict:
    schema: dict = {"type": "integer", "minimum": 0, "maximum": 9}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def wide_schema(num_properties: int, required: bool = False) -> dict:
    names = [f"p{i}" for i in range(num_properties)]
    return {"type": "object", "properties": {n: {"type": "boolean"} for n in names},
            **({"required": names} if required else {})}


RECURSIVE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer", "minimum": 0, "maximum": 9}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                   "maxItems": 2}},
    "required": ["v", "kids"]}}, "type": "object", "$ref": "#/$defs/node"}
def any_of_objects(n: int) -> dict:
    return {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "boolean"}}, "required": [f"k{i}"]}
                      for i in range(n)]}


def json_schema(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def tools(n: int, parameters: dict | None = None) -> list[dict]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters or {
        "type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}}} for i in range(n)]


def chain_grammar(rules: int) -> str:
    """A chain of Lark rules each naming the next: llguidance recurses once a rule."""
    return "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(rules)) + f'r{rules}: "z"\n'


# body fields -> (the status, and for a 400 the field it names)
CHAT_CASES = {
    "a schema 200 objects deep": (json_schema(deep_schema(200)), 400, "response_format.json_schema.schema"),
    "a schema 30 objects deep": (json_schema(deep_schema(30)), 200, None),
    "a schema of 5,000 properties": (json_schema(wide_schema(5000)), 400, "response_format.json_schema.schema"),
    # within the size limit, but 2,000 optional properties overflow the parser's rows at "{"
    "a schema of 2,000 optional properties": (json_schema(wide_schema(2000)), 400, "response_format"),
    "a schema of 1,300 required properties": (json_schema(wide_schema(1300, required=True)), 200, None),
    "a recursive $ref": (json_schema(RECURSIVE), 200, None),
    "a $ref to itself": (json_schema({"$ref": "#"}), 400, None),
    "a $ref nowhere": (json_schema({"$ref": "#/$defs/missing"}), 400, "response_format.json_schema.schema"),
    "an enum of 10,000": (json_schema({"enum": [f"value {i}" for i in range(10_000)]}), 400,
                          "response_format.json_schema.schema"),
    "an enum of 4,000": (json_schema({"enum": [f"value {i}" for i in range(4_000)]}), 200, None),
    "an anyOf of 1,500 consts": (json_schema({"anyOf": [{"const": i} for i in range(1500)]}), 200, None),
    "an anyOf of 500 objects": (json_schema(any_of_objects(500)), 200, None),
    "an anyOf of 3,000 objects": (json_schema(any_of_objects(3000)), 400, "response_format.json_schema.schema"),
    "a schema that is JSON text nested 100,000 deep": ({"structured_outputs": {"json": "[" * 100_000}}, 400,
                                                       "structured_outputs.json"),
    "a choice of 3,000": ({"structured_outputs": {"choice": [f"option {i}" for i in range(3000)]}}, 200, None),
    "a choice of 20,000": ({"structured_outputs": {"choice": [f"o{i}" for i in range(20_000)]}}, 400,
                           "structured_outputs.choice"),
    "a regex that does not parse": ({"structured_outputs": {"regex": "(unclosed"}}, 400, "structured_outputs.regex"),
    "a regex with a backreference": ({"structured_outputs": {"regex": "(a)\\1"}}, 400, "structured_outputs.regex"),
    "a regex repeating 100,000 times": ({"structured_outputs": {"regex": "a{100000}"}}, 400,
                                        "structured_outputs.regex"),
    "a regex of nested repetitions": ({"structured_outputs": {"regex": "((a{100}){100}){100}"}}, 400,
                                      "structured_outputs.regex"),
    "a regex of 100,000 characters": ({"structured_outputs": {"regex": "ab|" * 33_334}}, 400,
                                      "structured_outputs.regex"),
    "a Lark grammar that does not parse": ({"structured_outputs": {"grammar": "start: ((("}}, 400,
                                           "structured_outputs.grammar"),
    "a Lark grammar nested 5,000 deep": ({"structured_outputs": {"grammar": "start: " + "(" * 5000 + '"a"'
                                                                 + ")" * 5000}}, 400, "structured_outputs.grammar"),
    "a Lark grammar repeating 30,000 times": ({"structured_outputs": {"grammar": 'start: "a"~30000'}}, 400,
                                              "structured_outputs.grammar"),
    # long enough to overflow an ordinary thread's stack when llguidance builds it
    "a chain of 5,000 Lark rules": ({"structured_outputs": {"grammar": chain_grammar(5000)}}, 200, None),
    "a Lark grammar of 100,000 characters": ({"structured_outputs": {"grammar": chain_grammar(9000)}}, 400,
                                             "structured_outputs.grammar"),
    "2,000 tools": ({"tools": tools(2000), "tool_choice": "required"}, 400, "tools"),
    "a tool 200 objects deep": ({"tools": tools(1, deep_schema(200)), "tool_choice": "required"}, 400, "tools[0]"),
    "a tool with recursive parameters": ({"tools": tools(1, RECURSIVE), "tool_choice": "required"}, 200, None),
}


def assert_still_serving(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_completions_refuse_or_serve_each(http: httpx.Client, case: str):
    fields, status, param = CHAT_CASES[case]
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **fields})
    if status == 400:
        error = assert_error(response, 400, param)
        assert error["type"] == "invalid_request_error"
    else:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert_still_serving(http)


def test_the_limits_named_in_the_messages(http: httpx.Client):
    """Each refusal says which limit, so a client knows what to change (and an operator
    which flag raises it)."""
    def message(fields: dict) -> str:
        response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **fields})
        return assert_error(response, 400)["message"]

    assert "--max-schema-depth" in message(json_schema(deep_schema(200)))
    assert "--max-schema-size" in message(json_schema(wide_schema(5000)))
    assert "max_items_in_row" in message(json_schema(wide_schema(2000)))
    assert "--max-choices" in message({"structured_outputs": {"choice": [f"o{i}" for i in range(20_000)]}})
    assert "--max-regex-repetition" in message({"structured_outputs": {"regex": "(a{1000}){1000}"}})
    assert "--max-grammar-length" in message({"structured_outputs": {"regex": "ab|" * 33_334}})
    assert "--max-tools" in message({"tools": tools(2000)})


def test_an_operator_raises_a_limit_with_its_setting(launch):
    schema = json_schema(deep_schema(40))  # 81 levels: objects and their properties
    with launch().http() as http:
        assert_error(http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **schema}), 400)
    with launch(max_schema_depth=128).http() as http:
        answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **schema})
        assert answer.status_code == 200, answer.text


def test_completions_refuse_a_hostile_constraint(http: httpx.Client):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                                  "structured_outputs": {"regex": "((a{100}){100}){100}"}})
    assert_error(response, 400, "structured_outputs.regex")
    assert_still_serving(http)


# a grammar whose 3,000-way rule comes after 40 characters: the probe at admission walks
# fewer, so the parser's row limit is met while the answer is being written
LATE_TROUBLE = ("start: " + "c " * 40 + 'word\nc: "x" | "y"\nword: ' + " | ".join(f'"w{i}"' for i in range(3000)))


def test_a_grammar_failing_after_its_first_tokens_is_a_400_or_an_error_event(server, http: httpx.Client):
    body = {"messages": MESSAGES, "max_tokens": 60, "structured_outputs": {"grammar": LATE_TROUBLE}}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "structured_outputs")
    assert "max_items_in_row" in error["message"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200  # the first tokens were fine: the stream had begun
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    failure = json.loads(events[-2])["error"]
    assert failure["type"] == "invalid_request_error" and failure["param"] == "structured_outputs"
    assert_still_serving(http)


# --- the Responses API -----------------------------------------------------------------------


def response_format(schema: dict) -> dict:
    return {"text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}


RESPONSES_CASES = {
    "a format 200 objects deep": (response_format(deep_schema(200)), 400, "text.format.schema"),
    "a format of 5,000 properties": (response_format(wide_schema(5000)), 400, "text.format.schema"),
    "a format with 2,000 optional properties": (response_format(wide_schema(2000)), 400, "text.format"),
    "a recursive format": (response_format(RECURSIVE), 200, None),
    "2,000 tools": ({"tools": [{"type": "function", "name": f"t{i}", "parameters": {"type": "object"}}
                               for i in range(2000)]}, 400, "tools"),
    "a tool 200 objects deep": ({"tools": [{"type": "function", "name": "t", "parameters": deep_schema(200)}],
                                 "tool_choice": "required"}, 400, "tools[0]"),
}


@pytest.mark.parametrize("case", list(RESPONSES_CASES))
def test_the_responses_api_refuses_or_serves_each(http: httpx.Client, case: str):
    fields, status, param = RESPONSES_CASES[case]
    response = http.post("/v1/responses", json={"input": "Answer in JSON.", "max_output_tokens": 4, **fields})
    if status == 400:
        assert_error(response, 400, param)
    else:
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("completed", "incomplete")
    assert_still_serving(http)


# --- Anthropic's Messages API ------------------------------------------------------------------


def anthropic_tools(n: int, schema: dict | None = None) -> list[dict]:
    schema = schema or {"type": "object", "properties": {"x": {"type": "boolean"}}}
    return [{"name": f"tool_{i}", "input_schema": schema} for i in range(n)]


MESSAGES_CASES = {
    "2,000 tools": ({"tools": anthropic_tools(2000)}, 400),
    "a tool 200 objects deep": ({"tools": anthropic_tools(1, deep_schema(200)), "tool_choice": {"type": "any"}}, 400),
    "a tool of 5,000 properties": ({"tools": anthropic_tools(1, wide_schema(5000)), "tool_choice": {"type": "any"}},
                                   400),
    "a tool with 2,000 optional properties": ({"tools": anthropic_tools(1, wide_schema(2000)),
                                               "tool_choice": {"type": "any"}}, 400),
    "a tool with recursive parameters": ({"tools": anthropic_tools(1, RECURSIVE), "tool_choice": {"type": "any"}},
                                         200),
}


@pytest.mark.parametrize("case", list(MESSAGES_CASES))
def test_the_messages_api_refuses_or_serves_each(http: httpx.Client, case: str):
    fields, status = MESSAGES_CASES[case]
    response = http.post("/v1/messages", json={"model": "tiny-gpt2", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "Hi"}], **fields})
    if status == 400:
        assert "tools" in assert_anthropic_error(response, 400, "invalid_request_error")
    else:
        assert response.status_code == 200, response.text
        assert response.json()["type"] == "message"
    assert_still_serving(http)
