"""Every failure is OpenAI's error body with OpenAI's status: 400 (never 422), 401, 404,
413, 429, 500 carrying the request id, 503."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from gptserve.engine.outputs import RequestFailedError

MESSAGES = [{"role": "user", "content": "Hi"}]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def chat_body(**fields) -> dict:
    return {"model": "tiny-gpt2", "messages": MESSAGES, "max_tokens": 4, **fields}


# --- 400: the body ---------------------------------------------------------------------


def test_invalid_json_is_400(http: httpx.Client):
    response = http.post("/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert assert_error(response, 400)["type"] == "invalid_request_error"


def test_body_that_is_not_an_object_is_400(http: httpx.Client):
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)


def test_missing_required_field_is_400_naming_it(http: httpx.Client):
    error = assert_error(http.post("/v1/chat/completions", json={"model": "tiny-gpt2"}), 400, "messages")
    assert "messages" in error["message"]


def test_wrongly_typed_field_is_400_naming_it(http: httpx.Client):
    assert_error(http.post("/v1/chat/completions", json=chat_body(temperature="hot")), 400, "temperature")


def test_wrongly_typed_nested_field_names_its_path(http: httpx.Client):
    body = chat_body(messages=[{"role": "user", "content": "a"}, {"role": "user"}, {"role": 5, "content": "x"}])
    assert_error(http.post("/v1/chat/completions", json=body), 400, "messages[2].role")


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
])
def test_unsupported_openai_field_is_400_naming_it(http: httpx.Client, field, value):
    error = assert_error(http.post("/v1/chat/completions", json=chat_body(**{field: value})), 400, field)
    assert field in error["message"] and "not supported" in error["message"]
    assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_non_text_content_part_is_400_naming_its_type(http: httpx.Client, part):
    body = chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, part]}])
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "messages[0].content")
    assert part["type"] in error["message"] and "not supported" in error["message"]


def test_text_response_format_is_accepted(http: httpx.Client):
    assert http.post("/v1/chat/completions", json=chat_body(response_format={"type": "text"})).status_code == 200


def test_completion_suffix_is_400(http: httpx.Client):
    body = {"model": "tiny-gpt2", "prompt": "a", "suffix": "b", "max_tokens": 2}
    assert_error(http.post("/v1/completions", json=body), 400, "suffix")


@pytest.mark.parametrize("fields,param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"hello": 5}}, "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"50256": 500}}, "logit_bias"),
    ({"stop": [str(i) for i in range(20)]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_k": -5}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_out_of_range_setting_is_400_naming_it(http: httpx.Client, fields, param):
    assert_error(http.post("/v1/chat/completions", json=chat_body(**fields)), 400, param)


def test_completion_logprobs_out_of_range_is_400_naming_logprobs(http: httpx.Client):
    body = {"model": "tiny-gpt2", "prompt": "a", "logprobs": 50}
    assert_error(http.post("/v1/completions", json=body), 400, "logprobs")


def test_completion_token_ids_outside_the_vocabulary_are_400(http: httpx.Client):
    body = {"model": "tiny-gpt2", "prompt": [1, 2, 10**6]}
    assert_error(http.post("/v1/completions", json=body), 400, "prompt")


def test_openai_client_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, temperature=9)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"


# --- 400: too long for the context -------------------------------------------------------


def test_prompt_and_max_tokens_over_the_context_is_400_naming_the_limit(http: httpx.Client):
    body = chat_body(messages=[{"role": "user", "content": "hello " * 240}], max_tokens=50)
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, "messages")
    assert "256" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_prompt_filling_the_context_is_400_when_max_tokens_is_unset(http: httpx.Client):
    body = chat_body(messages=[{"role": "user", "content": "hello " * 300}], max_tokens=None)
    assert "256" in assert_error(http.post("/v1/chat/completions", json=body), 400)["message"]


def test_long_completion_prompt_is_400_naming_the_limit(http: httpx.Client):
    body = {"model": "tiny-gpt2", "prompt": [[1] * 250], "max_tokens": 16}
    error = assert_error(http.post("/v1/completions", json=body), 400, "prompt")
    assert "256" in error["message"]


def test_long_stream_request_is_400_not_a_broken_stream(http: httpx.Client):
    body = chat_body(messages=[{"role": "user", "content": "hello " * 240}], max_tokens=50, stream=True)
    assert_error(http.post("/v1/chat/completions", json=body), 400)


# --- 404 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "a"}),
])
def test_unknown_model_is_404(http: httpx.Client, path, body):
    error = assert_error(http.post(path, json=body), 404, "model")
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "gpt-4o" in error["message"]


def test_openai_client_raises_not_found_for_unknown_model(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_unknown_route_is_404_in_openai_shape(http: httpx.Client):
    assert_error(http.get("/v1/engines"), 404)


# --- 401 ----------------------------------------------------------------------------------


def test_missing_api_key_is_401(keyed_server):
    with keyed_server.http() as http:
        error = assert_error(http.post("/v1/chat/completions", json=chat_body()), 401)
    assert error["code"] == "invalid_api_key"


def test_wrong_api_key_is_401(keyed_server):
    with keyed_server.http(headers={"Authorization": "Bearer sk-wrong"}) as http:
        assert_error(http.get("/v1/models"), 401)


def test_wrong_api_key_is_401_even_with_an_invalid_body(keyed_server):
    with keyed_server.http(headers={"Authorization": "Bearer sk-wrong"}) as http:
        assert_error(http.post("/v1/chat/completions", json={"bogus": 1}), 401)


def test_openai_client_with_the_right_key_is_served(keyed_server):
    reply = keyed_server.client().chat.completions.create(model="tiny-gpt2", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_openai_client_with_a_wrong_key_raises_authentication_error(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_and_metrics_need_no_key(keyed_server):
    with keyed_server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


# --- 413 ----------------------------------------------------------------------------------


def test_declared_oversized_body_is_413(http: httpx.Client):
    big = {"model": "tiny-gpt2", "prompt": "x" * (3 * 2**20)}
    error = assert_error(http.post("/v1/completions", json=big), 413)
    assert str(2 * 2**20) in error["message"]


def test_streamed_oversized_body_is_413(http: httpx.Client):
    def chunks():
        yield b'{"model": "tiny-gpt2", "prompt": "'
        for _ in range(48):
            yield b"x" * 2**16
        yield b'"}'

    response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413)


# --- 429 ----------------------------------------------------------------------------------


def test_request_beyond_max_queued_requests_is_429(single_slot_server):
    body = chat_body(max_tokens=200, stream=True, ignore_eos=True)
    with single_slot_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # admitted and streaming
        error = assert_error(http.post("/v1/chat/completions", json=chat_body()), 429)
    assert error["type"] == "rate_limit_error"


def test_queue_slot_is_given_back_when_a_request_ends(single_slot_server):
    wait_until(lambda: single_slot_server.serving.num_in_flight == 0)  # earlier tests' streams
    with single_slot_server.http() as http:
        for _ in range(3):
            assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


# --- 500 and 503 --------------------------------------------------------------------------


@pytest.fixture
def failing_engine(server, monkeypatch):
    """The engine fails every request, as it does when processing one raises."""
    async def generate(prompt_token_ids, params, request_id):
        raise RequestFailedError(request_id, "simulated failure")
        yield  # an async generator, like the real one

    monkeypatch.setattr(server.serving.engine, "generate", generate)


def test_engine_failure_is_500_carrying_the_request_id(http: httpx.Client, failing_engine):
    error = assert_error(http.post("/v1/chat/completions", json=chat_body()), 500)
    assert "chatcmpl-" in error["message"] and "simulated failure" in error["message"]


def test_server_that_is_not_ready_is_503(http: httpx.Client, server, monkeypatch):
    monkeypatch.setattr(server.serving.shared, "draining", True)
    assert_error(http.get("/health"), 503)
    assert_error(http.post("/v1/chat/completions", json=chat_body()), 503)
