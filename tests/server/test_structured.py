"""Structured outputs and tool calls: whatever the weights, constrained output matches the
caller's schema (unless cut by max_tokens), through the official client, whole and
streamed; bad constraints are 400s naming the field, before anything is generated."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.test_errors import assert_error

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMAS = {
    "nested object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array with min and max items": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "enum, integer and number": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "score": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"}},
        "required": ["colour", "count", "score", "ok"], "additionalProperties": False},
    "optional field and string lengths": {"type": "object", "properties": {
        "id": {"type": "string", "minLength": 2, "maxLength": 4}, "note": {"type": "string", "maxLength": 5}},
        "required": ["id"], "additionalProperties": False},
    "anyOf": {"anyOf": [{"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer",
                                                                                            "minimum": 1, "maximum": 9}},
                         "required": ["kind", "lives"], "additionalProperties": False},
                        {"type": "object", "properties": {"kind": {"const": "dog"}},
                         "required": ["kind"], "additionalProperties": False}]},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def check_choices(choices: list[tuple[str, str]], schema: dict) -> None:
    """Every choice that ended on its own parses and validates; cut ones (length) may not."""
    assert any(finish == "stop" for _, finish in choices), "no choice finished its JSON"
    for text, finish in choices:
        assert finish in ("stop", "length")
        if finish == "stop":
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate_whole_and_streamed(server, client: openai.OpenAI, name: str):
    schema = SCHEMAS[name]
    whole = client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, max_tokens=120, n=3, seed=1,
                                           response_format=json_format(schema))
    check_choices([(c.message.content, c.finish_reason) for c in whole.choices], schema)
    texts, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, max_tokens=120, n=2,
                                                seed=2, stream=True, response_format=json_format(schema)):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    check_choices(list(zip(texts, finishes)), schema)


def test_json_object_answers_are_objects_on_chat_and_completions(http: httpx.Client):
    # any object may hold strings without end: a random model rarely closes one, so '"' and '}'
    # are favoured (logit_bias) for the answers to end within max_tokens
    bias = {"1": 8, "92": 8}
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 150, "n": 4, "logit_bias": bias,
                                                   "response_format": {"type": "json_object"}}).json()
    done = [c["message"]["content"] for c in chat["choices"] if c["finish_reason"] == "stop"]
    completion = http.post("/v1/completions", json={"prompt": "{", "max_tokens": 150, "n": 4, "logit_bias": bias,
                                                    "response_format": {"type": "json_object"}}).json()
    done += [c["text"] for c in completion["choices"] if c["finish_reason"] == "stop"]
    assert done and all(isinstance(json.loads(text), dict) for text in done)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_structured_outputs_regex_choice_and_grammar(http: httpx.Client, path: str):
    base = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Answer:"}
    text = (lambda r: r["choices"][0]["message"]["content"]) if "chat" in path else (lambda r: r["choices"][0]["text"])
    cases = [({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
             ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
             ({"grammar": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'}, lambda t: t[0] == "(" and t[-1] == ")")]
    for constraint, ok in cases:
        for seed in range(3):
            body = {**base, "max_tokens": 40, "seed": seed, "temperature": 1.0, "structured_outputs": constraint}
            response = http.post(path, json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            if answer["choices"][0]["finish_reason"] == "stop":
                assert ok(text(answer)), (constraint, text(answer))


def test_greedy_constrained_output_is_the_same_alone_and_batched(server):
    import asyncio

    client = server.async_client()
    body = dict(model="tiny-gpt2", messages=MESSAGES, max_tokens=40, temperature=0,
                response_format=json_format(SCHEMAS["enum, integer and number"]))

    async def run():
        alone = await client.chat.completions.create(**body)
        crowd = [client.chat.completions.create(model="tiny-gpt2", max_tokens=30, temperature=0.8,
                                                messages=[{"role": "user", "content": f"Story {i}"}],
                                                extra_body={"ignore_eos": True}) for i in range(6)]
        batched, *_ = await asyncio.gather(client.chat.completions.create(**body), *crowd)
        await client.close()
        return alone, batched

    alone, batched = asyncio.run(run())
    assert alone.choices[0].message.content == batched.choices[0].message.content


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=10)  # bounded, so a random model's answer ends
    age: int = Field(ge=0, le=120)


def test_the_official_clients_parse_fills_a_pydantic_model(client: openai.OpenAI):
    for seed in range(4):
        completion = client.chat.completions.parse(model="tiny-gpt2", messages=MESSAGES, max_tokens=80,
                                                   response_format=Person, seed=seed)
        assert isinstance(completion.choices[0].message.parsed, Person)


def test_the_bundled_model_answers_with_valid_json(launch_bundled):
    schema = SCHEMAS["nested object"]
    with launch_bundled.http() as http:
        answer = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Where dwelt Abraham?"}], "max_tokens": 80, "n": 3, "seed": 0,
            "response_format": json_format(schema)}).json()
    check_choices([(c["message"]["content"], c["finish_reason"]) for c in answer["choices"]], schema)


ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


SAFE_ADD_ARGUMENTS = {**ADD["function"]["parameters"], "properties": {
    name: {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1} for name in ("a", "b")}}


def test_the_bundled_model_ends_unbounded_integer_arguments(launch_bundled):
    """Integers without bounds are held to |n| <= 2^53-1 (schema_rewrite.py): unbounded, the
    bundled model writes digits until max_tokens and no call is ever complete."""
    import asyncio

    async def ask(seed: int) -> dict:
        async with httpx.AsyncClient(base_url=launch_bundled.base_url, timeout=600) as http:
            response = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "tools": [ADD],
                "tool_choice": "required", "max_tokens": 200, "seed": seed})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

    async def ask_all() -> list[dict]:
        return await asyncio.gather(*(ask(seed) for seed in range(20)))

    called = 0
    for choice in asyncio.run(ask_all()):
        calls = choice["message"].get("tool_calls") or []
        assert choice["finish_reason"] in ("tool_calls", "length")
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SAFE_ADD_ARGUMENTS)
        called += bool(calls)
    assert called >= 19


@pytest.fixture(scope="module")
def launch_bundled():
    from gptserve.weights.loader import DEFAULT_MODEL_DIR
    from tests.server.conftest import start_server

    running = start_server(DEFAULT_MODEL_DIR)
    yield running
    running.stop()


# --- tools ------------------------------------------------------------------------------


def test_required_tool_choice_returns_a_valid_call(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=60,
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI):
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "What time is it?"}], max_tokens=60, seed=seed,
            tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = reply.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_time" for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_parallel_calls_are_each_valid(client: openai.OpenAI):
    """<|endoftext|> banned, so the model can only go on calling until max_tokens cuts it."""
    reply = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Weather and time?"}], max_tokens=120,
        seed=0, tools=[TIME], tool_choice="required", logit_bias={"50256": -100})
    calls = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "length" and len(calls) >= 2
    for call in calls:
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])
    assert len({c.id for c in calls}) == len(calls)


def test_auto_gives_either_text_or_a_valid_call(client: openai.OpenAI):
    kinds = set()
    for seed in range(8):
        reply = client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=40,
            seed=seed, tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False)
        message = reply.choices[0].message
        if message.tool_calls:
            kinds.add("call")
            jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        else:
            kinds.add("text")
            assert not (message.content or "").lstrip().startswith("<")
    assert kinds  # which kind a random model picks is its own business; both are well-formed


def test_streamed_tool_calls_reassemble_in_the_official_client(client: openai.OpenAI):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "Weather and time?"}], max_tokens=60,
            seed=3, stream=True, tools=[WEATHER, TIME], tool_choice="required"):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert calls and finish in ("tool_calls", "length")
    for call in calls.values():
        assert call["id"].startswith("call_")
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])


def test_the_official_clients_stream_helper_assembles_the_calls(client: openai.OpenAI):
    with client.chat.completions.stream(
            model="tiny-gpt2", messages=[{"role": "user", "content": "Time?"}], max_tokens=60, seed=1,
            tools=[TIME], tool_choice="required", parallel_tool_calls=False) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_a_two_turn_exchange_with_a_tool_result(client: openai.OpenAI):
    first = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=60,
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    second = client.chat.completions.create(
        model="tiny-gpt2", max_tokens=8, tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather in Paris?"}, first.choices[0].message,
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}])
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_legacy_functions_fields_give_a_function_call(http: httpx.Client):
    body = {"messages": [{"role": "user", "content": "Time?"}], "max_tokens": 60,
            "functions": [TIME["function"]], "function_call": {"name": "get_time"}}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_time"
    jsonschema.validate(json.loads(choice["message"]["function_call"]["arguments"]), TIME["function"]["parameters"])


def test_the_legacy_functions_stream_a_function_call(server):
    body = {"messages": [{"role": "user", "content": "Time?"}], "max_tokens": 60, "stream": True,
            "functions": [TIME["function"]], "function_call": {"name": "get_time"}}
    chunks = [json.loads(e) for e in server.sse("/v1/chat/completions", body)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    name = "".join(d["function_call"].get("name") or "" for d in deltas if "function_call" in d)
    arguments = "".join(d["function_call"].get("arguments") or "" for d in deltas if "function_call" in d)
    assert name == "get_time" and not any("tool_calls" in d for d in deltas)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def test_a_tool_message_without_its_call_id_is_400(http: httpx.Client):
    body = {"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "messages[0]")


# --- bad constraints are 400s naming the field ----------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"response_format": json_format({"type": 12})}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": json_format({"type": "string", "pattern": "(?=a)a"})},  # valid JSON Schema, no grammar
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[0]"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_bad_constraint_is_400_naming_it(http: httpx.Client, body: dict, param: str):
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert_error(response, 400, param)
