"""POST /v1/responses through the official client: one chat turn answered as a response,
stored and continued by previous_response_id (across a restart and between two servers
sharing a state directory), function tools, text formats, and the stream's events."""
from __future__ import annotations

import json
import threading

import openai
import pytest

from tests.server.conftest import RunningServer, start_server
from tests.server.test_errors import assert_error
from tests.server.test_faults import FAULTY, arm_fault  # noqa: F401 - a fixture

CITY_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
             "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                            "required": ["city"]}}


def test_a_response_answers_as_the_chat_endpoint_does(client: openai.OpenAI):
    response = client.responses.create(model="tiny-gpt2", input="In the beginning", instructions="Be brief.",
                                       temperature=0, max_output_tokens=12)
    chat = client.chat.completions.create(model="tiny-gpt2", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "In the beginning"}])
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.output_text == chat.choices[0].message.content
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief." and response.store is True


def test_max_output_tokens_leaves_the_response_incomplete(client: openai.OpenAI):
    response = client.responses.create(model="tiny-gpt2", input="Count:", max_output_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_a_stored_response_is_retrieved_listed_and_deleted(client: openai.OpenAI):
    response = client.responses.create(model="tiny-gpt2", input=[
        {"role": "user", "content": "first"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]}],
        max_output_tokens=5, metadata={"topic": "test"})
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    items = client.responses.input_items.list(response.id, order="asc")
    assert [item.content[0].text for item in items.data] == ["first", "second"]
    assert all(item.id.startswith("msg_") for item in items.data)
    newest_first = client.responses.input_items.list(response.id, limit=1)
    assert [i.id for i in newest_first.data] == [items.data[1].id] and newest_first.has_more
    after = client.responses.input_items.list(response.id, limit=1, after=items.data[1].id)
    assert [i.id for i in after.data] == [items.data[0].id] and not after.has_more
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_store_false_keeps_nothing(client: openai.OpenAI):
    response = client.responses.create(model="tiny-gpt2", input="hello", max_output_tokens=3, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI):
    first = client.responses.create(model="tiny-gpt2", input="Who made the heaven?", temperature=0,
                                    max_output_tokens=6)
    second = client.responses.create(model="tiny-gpt2", input="And the earth?", temperature=0,
                                     max_output_tokens=6, previous_response_id=first.id)
    # the same conversation sent whole, as chat messages, is the same prompt and answer
    chat = client.chat.completions.create(model="tiny-gpt2", temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": "Who made the heaven?"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And the earth?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    # input_items lists this request's own input
    assert [i.content[0].text for i in client.responses.input_items.list(second.id).data] == ["And the earth?"]


def test_a_function_tool_round_trip(client: openai.OpenAI):
    response = client.responses.create(model="tiny-gpt2", input="Weather in Paris?", tools=[CITY_TOOL],
                                       tool_choice="required", parallel_tool_calls=False, max_output_tokens=40)
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    answer = client.responses.create(
        model="tiny-gpt2", previous_response_id=response.id, tools=[CITY_TOOL], max_output_tokens=8,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output[0].type == "message" and answer.status in ("completed", "incomplete")
    # the tool's output is part of the prompt: more input tokens than the call's conversation
    assert answer.usage.input_tokens > response.usage.input_tokens


def test_text_format_json_schema_constrains_the_answer(client: openai.OpenAI):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}},
              "required": ["answer"]}
    response = client.responses.create(model="tiny-gpt2", input="Answer in JSON.", max_output_tokens=40,
                                       text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    assert set(json.loads(response.output_text)) == {"answer"}
    assert response.text.format.type == "json_schema"


def test_the_stream_is_openais_event_sequence(client: openai.OpenAI):
    # (the client's stream helper gives a final response only for response.completed; a tiny
    # random model is cut by max_output_tokens, so the last event is read as sent)
    events = list(client.responses.create(model="tiny-gpt2", input="In the beginning", max_output_tokens=10,
                                          temperature=0, stream=True))
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == client.responses.create(
        model="tiny-gpt2", input="In the beginning", max_output_tokens=10, temperature=0).output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_a_streamed_function_call_has_its_argument_events(client: openai.OpenAI):
    with client.responses.stream(model="tiny-gpt2", input="Weather?", tools=[CITY_TOOL], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == final.output[0].arguments and json.loads(done.arguments)["city"] in ("Paris", "Rome")


def test_raw_sse_names_each_event_by_its_type_and_sends_no_done(server):
    with server.http() as http, http.stream("POST", "/v1/responses", json={
            "model": "tiny-gpt2", "input": "hi", "stream": True, "max_output_tokens": 3}) as response:
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data] and len(names) == len(data) >= 8
    assert not any(line == "data: [DONE]" for line in lines)


def stream_data(running: RunningServer, body: dict) -> list[dict]:
    """POST a streamed response; the data of each event, in order."""
    with running.http() as http, http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_fault_mid_stream_is_an_error_event_in_sequence_then_response_failed(server, arm_fault):  # noqa: F811
    arm_fault(after=3)
    events = stream_data(server, {"input": FAULTY, "max_output_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "injected fault" in events[-2]["message"] and events[-1]["response"]["status"] == "failed"


def test_a_store_that_fails_at_the_end_is_an_error_event_in_sequence(server, monkeypatch):
    async def put(response: dict, input_items: list) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(server.server.config.app.state.store, "put", put)
    events = stream_data(server, {"input": "hi", "max_output_tokens": 3})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


@pytest.mark.parametrize("body, status, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input[0].content[0].type"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "input[0].type"),
    ({"input": [{"content": "no role"}]}, 400, "input[0]"),
    ({"input": []}, 400, "input"),
    ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input"),
    ({"input": "hi", "tools": [CITY_TOOL], "tool_choice": {"type": "function", "name": "other"}}, 400,
     "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, 400,
     "text.format.schema"),
    ({"input": "hi", "background": True}, 400, "background"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
])
def test_bad_input_is_refused_in_openais_shape(server, body: dict, status: int, param: str):
    with server.http() as http:
        assert_error(http.post("/v1/responses", json={"model": "tiny-gpt2", **body}), status, param)
        assert http.post("/v1/responses", json={"input": "still serving", "max_output_tokens": 2}).status_code == 200


def test_the_store_survives_a_restart_and_is_shared_by_two_servers(tiny_checkpoint, tmp_path):
    first = start_server(tiny_checkpoint, state_dir=str(tmp_path))
    try:
        earlier = first.client().responses.create(model="tiny-gpt2", input="one", max_output_tokens=3)
    finally:
        first.stop()
    a, b = (start_server(tiny_checkpoint, state_dir=str(tmp_path)) for _ in range(2))
    try:
        assert a.client().responses.retrieve(earlier.id).output_text == earlier.output_text
        # both write at once, each continuing the conversation the other stored
        errors, ids = [], {}

        def converse(name, server, previous):
            try:
                for turn in range(4):
                    r = server.client().responses.create(model="tiny-gpt2", input=f"{name} {turn}",
                                                         previous_response_id=previous, max_output_tokens=2)
                    previous = r.id
                ids[name] = previous
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=converse, args=(n, s, earlier.id)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        crossed = b.client().responses.create(model="tiny-gpt2", input="end", previous_response_id=ids["a"],
                                              max_output_tokens=2)
        assert crossed.usage.input_tokens > earlier.usage.input_tokens
    finally:
        a.stop()
        b.stop()


def test_retention_forgets_the_oldest_responses(tiny_checkpoint, tmp_path):
    running = start_server(tiny_checkpoint, state_dir=str(tmp_path), max_stored_responses=2)
    try:
        client = running.client()
        ids = [client.responses.create(model="tiny-gpt2", input=str(i), max_output_tokens=2).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
    finally:
        running.stop()


def test_no_store_serves_statelessly(tiny_checkpoint):
    running = start_server(tiny_checkpoint, store_responses=False)
    try:
        client = running.client()
        response = client.responses.create(model="tiny-gpt2", input="hi", max_output_tokens=2)
        assert response.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)
        with pytest.raises(openai.BadRequestError, match="--no-store"):
            client.responses.create(model="tiny-gpt2", input="hi", previous_response_id=response.id)
    finally:
        running.stop()


def test_get_routes_answer_head(server):
    with server.http() as http:
        response_id = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2}).json()["id"]
        assert http.head(f"/v1/responses/{response_id}").status_code == 200
