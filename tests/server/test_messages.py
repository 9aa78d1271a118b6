"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), end to end through
the official `anthropic` SDK and raw HTTP: a message in Anthropic's shape, whole and
streamed in Anthropic's event order; stop reasons; tools with tool_use and tool_result
blocks; token counts; the same greedy answer as /v1/chat/completions; every error in
Anthropic's shape and status, with the server serving on afterwards.

Recent SDKs dropped `temperature` from `messages.create` (it is still in the API), so greedy
requests send it as `extra_body`.
"""
from __future__ import annotations

import json
from typing import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from tests.server.conftest import API_KEY, RunningServer, start_server
from tests.server.test_faults import FAULTY, arm_fault, assert_nothing_held  # noqa: F401 - a fixture

GREEDY = {"extra_body": {"temperature": 0}}
HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                             "unit": {"enum": ["C", "F"]}},
                            "required": ["city", "unit"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                             "required": ["zone"]}}
SCHEMAS = {"get_weather": WEATHER["input_schema"], "get_time": TIME["input_schema"]}
STREAM_ORDER = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop"]


def sdk(running: RunningServer, api_key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=running.base_url, api_key=api_key or running.api_key, max_retries=0)


@pytest.fixture
def client(server: RunningServer) -> anthropic.Anthropic:
    return sdk(server)


def body(**fields) -> dict:
    return {"model": "tiny-gpt2", "max_tokens": 8, "messages": HELLO, **fields}


def sse_events(running: RunningServer, request: dict) -> list[tuple[str, dict]]:
    """POST a streamed request; its (event name, data) pairs, in order."""
    with running.http() as http, http.stream("POST", "/v1/messages", json={**request, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert len(names) == len(data) and all(d["type"] == name for name, d in zip(names, data))
    return list(zip(names, data))


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    """Anthropic's error body, exactly; its message."""
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and set(error) == {"type", "error"}
    assert set(error["error"]) == {"type", "message"} and error["error"]["type"] == kind
    assert error["error"]["message"]
    return error["error"]["message"]


def assert_still_serving(client: anthropic.Anthropic) -> None:
    assert client.messages.create(model="tiny-gpt2", max_tokens=2, messages=HELLO).content


# --- a message ------------------------------------------------------------------------------


def test_create_answers_a_message_in_anthropics_shape(client: anthropic.Anthropic):
    message = client.messages.create(model="tiny-gpt2", max_tokens=8, messages=HELLO)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny-gpt2"
    assert message.id.startswith("msg_")
    [block] = message.content
    assert block.type == "text" and isinstance(block.text, str)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > 0
    assert 0 < message.usage.output_tokens <= 8


def test_max_tokens_ends_the_answer_with_stop_reason_max_tokens(client: anthropic.Anthropic):
    message = client.messages.create(model="tiny-gpt2", max_tokens=3, messages=HELLO, **GREEDY)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_a_stop_sequence_ends_the_answer_and_is_named(client: anthropic.Anthropic):
    whole = client.messages.create(model="tiny-gpt2", max_tokens=12, messages=HELLO, **GREEDY).content[0].text
    stop = whole.split()[1]  # a word the greedy answer writes after its first
    message = client.messages.create(model="tiny-gpt2", max_tokens=12, messages=HELLO, stop_sequences=["zzz", stop],
                                     **GREEDY)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == whole[:whole.index(stop)]


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint) -> Iterator[RunningServer]:
    """A server of this module's own: a 4 KiB body limit, and a template stop tests may change."""
    running = start_server(tiny_checkpoint, max_body_bytes=4096)
    yield running
    running.stop()


def test_the_templates_implicit_stop_is_end_turn_not_a_stop_sequence(small_server: RunningServer):
    client = sdk(small_server)
    whole = client.messages.create(model="tiny-gpt2", max_tokens=12, messages=HELLO, **GREEDY).content[0].text
    stop = " " + whole.split()[1]
    template = small_server.serving.chat_template
    template.stop, implicit = [stop], template.stop  # the answer now meets the template's stop ("\nUser:")
    try:
        message = client.messages.create(model="tiny-gpt2", max_tokens=12, messages=HELLO, **GREEDY)
        asked = client.messages.create(model="tiny-gpt2", max_tokens=12, messages=HELLO, stop_sequences=[stop],
                                       **GREEDY)
    finally:
        template.stop = implicit
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.content[0].text == whole[:whole.index(stop)]
    assert (asked.stop_reason, asked.stop_sequence) == ("stop_sequence", stop)


def test_a_greedy_answer_equals_chat_completions_for_the_same_conversation(server: RunningServer,
                                                                          client: anthropic.Anthropic):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Tell me a story"}]
    message = client.messages.create(model="tiny-gpt2", max_tokens=12, system="Be brief.", messages=turns, **GREEDY)
    chat = server.client().chat.completions.create(
        model="tiny-gpt2", max_tokens=12, temperature=0, messages=[{"role": "system", "content": "Be brief."}, *turns])
    assert message.content[0].text == chat.choices[0].message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens


def test_a_prefilled_assistant_turn_is_continued(server: RunningServer, client: anthropic.Anthropic):
    prefill = [*HELLO, {"role": "assistant", "content": "Well,"}]
    message = client.messages.create(model="tiny-gpt2", max_tokens=8, messages=prefill, **GREEDY)
    with server.http() as http:  # the prompt as the template writes it, ending with the prefill
        completion = http.post("/v1/completions", json={"prompt": "User: Hello there\nAssistant: Well,",
                                                        "max_tokens": 8, "temperature": 0}).json()
    assert message.content[0].text == completion["choices"][0]["text"]
    assert client.messages.count_tokens(model="tiny-gpt2", messages=prefill).input_tokens == \
        completion["usage"]["prompt_tokens"]


def test_count_tokens_equals_the_prompt_tokens_of_create(client: anthropic.Anthropic):
    request = {"model": "tiny-gpt2", "system": [{"type": "text", "text": "You help."}], "messages": HELLO,
               "tools": [WEATHER], "tool_choice": {"type": "auto"}}
    usage = client.messages.create(max_tokens=2, **request).usage
    counted = client.messages.count_tokens(**request).input_tokens
    assert counted == usage.input_tokens + usage.cache_read_input_tokens
    assert counted > client.messages.count_tokens(model="tiny-gpt2", messages=HELLO).input_tokens  # tools count


# --- streamed -------------------------------------------------------------------------------


def test_the_sdk_stream_helper_assembles_the_same_message(client: anthropic.Anthropic):
    whole = client.messages.create(model="tiny-gpt2", max_tokens=10, messages=HELLO, **GREEDY)
    with client.messages.stream(model="tiny-gpt2", max_tokens=10, messages=HELLO, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("msg_") and final.model == "tiny-gpt2"


def test_raw_stream_events_come_in_anthropics_order(server: RunningServer):
    events = sse_events(server, body(max_tokens=6, temperature=0))
    names = [name for name, _ in events]
    assert names[:3] == STREAM_ORDER[:3] and names[-3:] == STREAM_ORDER[-3:]
    assert set(names[3:-3]) == {"content_block_delta"}  # no [DONE], nothing else
    start, block = events[0][1]["message"], events[1][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert block == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6


# --- tools ----------------------------------------------------------------------------------


def test_tool_choice_any_gives_tool_use_blocks_that_match_their_schema(client: anthropic.Anthropic):
    """Parallel calls allowed: a greedy random model goes on calling until max_tokens cuts it;
    the calls it finished are the answer's blocks."""
    message = client.messages.create(model="tiny-gpt2", max_tokens=60, tools=[WEATHER, TIME],
                                     tool_choice={"type": "any"}, messages=[{"role": "user", "content": "Weather?"}],
                                     **GREEDY)
    assert message.stop_reason in ("tool_use", "max_tokens") and message.content
    for block in message.content:
        assert block.type == "tool_use" and block.id.startswith("toolu_")
        jsonschema.validate(block.input, SCHEMAS[block.name])


def test_tool_choice_tool_calls_that_tool_once_without_parallel_use(client: anthropic.Anthropic):
    message = client.messages.create(
        model="tiny-gpt2", max_tokens=60, tools=[WEATHER, TIME], messages=[{"role": "user", "content": "Time?"}],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}, **GREEDY)
    [block] = message.content
    assert message.stop_reason == "tool_use" and block.name == "get_time"
    jsonschema.validate(block.input, TIME["input_schema"])


def test_a_streamed_tool_use_reassembles_in_the_sdk(server: RunningServer, client: anthropic.Anthropic):
    request = {"model": "tiny-gpt2", "max_tokens": 60, "tools": [TIME], "tool_choice": {"type": "any"},
               "messages": [{"role": "user", "content": "Time?"}]}
    with client.messages.stream(**request, **GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].type == "tool_use"
    jsonschema.validate(final.content[0].input, TIME["input_schema"])
    events = sse_events(server, {**request, "temperature": 0})
    starts = [d["content_block"] for name, d in events if name == "content_block_start"]
    deltas = [d["delta"] for name, d in events if name == "content_block_delta"]
    assert starts[0]["type"] == "tool_use" and starts[0]["input"] == {}
    assert json.loads(deltas[0]["partial_json"]) == final.content[0].input and deltas[0]["type"] == "input_json_delta"


def test_a_tool_result_round_trip(client: anthropic.Anthropic):
    ask = {"role": "user", "content": "Weather in Paris?"}
    first = client.messages.create(model="tiny-gpt2", max_tokens=60, tools=[WEATHER], messages=[ask],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True}, **GREEDY)
    call = first.content[0]
    results = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": '{"temp": 21}'},
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "again"}],
         "is_error": True},
        {"type": "text", "text": "Thanks"}]}
    second = client.messages.create(model="tiny-gpt2", max_tokens=8, tools=[WEATHER],
                                    messages=[ask, {"role": "assistant", "content": first.content}, results])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,words", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "tool_use"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]}, "toolu_x"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"stop_sequences": "x"}, "stop_sequences"),
])
def test_a_bad_request_is_400_in_anthropics_shape(server: RunningServer, client: anthropic.Anthropic, fields, words):
    request = {k: v for k, v in body(**fields).items() if v is not None}
    with server.http() as http:
        message = assert_anthropic_error(http.post("/v1/messages", json=request), 400, "invalid_request_error")
    assert words in message
    assert_still_serving(client)


def test_the_sdk_raises_bad_request_for_an_unsupported_block(client: anthropic.Anthropic):
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="tiny-gpt2", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_404_not_found_error(client: anthropic.Anthropic):
    for call in (client.messages.create, client.messages.count_tokens):
        with pytest.raises(anthropic.NotFoundError) as raised:
            call(model="claude-next", messages=HELLO, **({"max_tokens": 2} if call == client.messages.create
                                                                else {}))
        assert raised.value.body["error"]["type"] == "not_found_error"
    assert_still_serving(client)


def test_the_api_key_is_read_from_x_api_key_or_a_bearer_token(keyed_server: RunningServer):
    with pytest.raises(anthropic.AuthenticationError) as raised:
        sdk(keyed_server, "sk-wrong").messages.create(model="tiny-gpt2", max_tokens=2, messages=HELLO)
    assert raised.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=keyed_server.base_url, auth_token=API_KEY, max_retries=0)
    assert_still_serving(bearer)
    with keyed_server.http() as http:
        assert_anthropic_error(http.post("/v1/messages/count_tokens", json=body()), 401, "authentication_error")
        assert_anthropic_error(http.post("/v1/messages", json={"bogus": 1}, headers={"x-api-key": "sk-wrong"}),
                               401, "authentication_error")
        assert http.get("/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert_still_serving(sdk(keyed_server, API_KEY))


def test_an_unknown_url_under_messages_is_404_in_anthropics_shape(server: RunningServer):
    with server.http() as http:
        assert_anthropic_error(http.post("/v1/messages/nope", json={}), 404, "not_found_error")
        assert set(http.get("/v1/nope").json()) == {"error"}  # OpenAI's routes keep OpenAI's shape


def test_a_body_over_the_limit_is_413_request_too_large(small_server: RunningServer):
    with small_server.http() as http:
        request = body(messages=[{"role": "user", "content": "x" * 5000}])
        assert_anthropic_error(http.post("/v1/messages", json=request), 413, "request_too_large")


def test_a_fault_mid_stream_is_an_anthropic_error_event(server: RunningServer, arm_fault):  # noqa: F811
    arm_fault(after=3)
    events = sse_events(server, body(max_tokens=16, temperature=0, messages=[{"role": "user", "content": FAULTY}]))
    name, error = events[-1]
    assert name == "error" and error["error"]["type"] == "api_error" and "injected fault" in error["error"]["message"]
    assert "message_stop" not in [n for n, _ in events] and events[0][0] == "message_start"
    with pytest.raises(anthropic.APIStatusError):
        with sdk(server).messages.stream(model="tiny-gpt2", max_tokens=16, messages=[
                {"role": "user", "content": FAULTY}], **GREEDY) as stream:
            stream.get_final_message()
    assert_nothing_held(server)


def test_the_openapi_document_gives_the_messages_routes_anthropics_errors(server: RunningServer):
    with server.http() as http:
        paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = paths[path]["post"]["responses"]
        for status in ("400", "401", "404", "413"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/AnthropicErrorResponse"), (path, status)
