"""Contract fuzzing: schemathesis reads the server's own /openapi.json and runs every
operation through its phases (boundary values, generated valid and invalid requests,
chains of calls), a bounded and seeded number of each.

Whatever it sends: no 5xx; every status, content type and body is one the document
declares; a request the document calls invalid is refused; every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}` (Anthropic's `{"type": "error", "error":
{"type", "message"}}` on /v1/messages*); every stream ends with `data: [DONE]` (Anthropic's
with a message_stop or error event, the Responses API's with response.completed,
response.incomplete or response.failed, its events numbered in order).
The tests after it pin what it found.

(schemathesis runs here through its engine, as its CLI does: its pytest plugin's lazy
schemas don't work with pytest 9.)
"""
from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema

from gptserve.server.errors import speaks_anthropic
from tests.server.conftest import RunningServer, start_server
from tests.server.test_errors import assert_error

FUZZ_CONFIG = """
seed = 20261123
suppress-health-check = ["all"]
request-timeout = 60

[generation]
mode = "all"              # valid requests and invalid ones
max-examples = 30         # per operation and phase
deterministic = true
no-shrink = true

[checks]
# the document states types and OpenAI's fixed ranges, not this server's configured
# limits (--max-n, ...), so a valid-looking request may well be refused
positive_data_acceptance.enabled = false
"""


@schemathesis.check
def errors_are_in_their_apis_shape(ctx, response, case) -> None:
    if response.status_code >= 400 and speaks_anthropic(case.path):
        body = json.loads(response.content)
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    elif response.status_code >= 400:
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error


@schemathesis.check
def streams_end_as_their_api_ends_them(ctx, response, case) -> None:
    streamed = response.status_code == 200 and response.headers.get("content-type", [""])[0].startswith(
        "text/event-stream")
    if streamed and speaks_anthropic(case.path):
        names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
        assert names and names[0] == "message_start" and names[-1] in ("message_stop", "error"), response.text
    elif streamed and case.path.startswith("/v1/responses"):
        data = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
                if line.startswith("data: ")]
        assert data and data[0]["type"] == "response.created", response.text
        assert data[-1]["type"] in ("response.completed", "response.incomplete", "response.failed"), response.text
        assert [event["sequence_number"] for event in data] == list(range(len(data))), response.text
    elif streamed:
        data = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert data and data[-1] == "[DONE]", response.text
        for event in map(json.loads, data[:-1]):
            assert "error" in event or event["object"] in ("chat.completion.chunk", "text_completion"), event


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint) -> Iterator[RunningServer]:
    """Small generation limits keep each generated request quick: 2 choices of 8 tokens at most."""
    running = start_server(tiny_checkpoint, max_n=2, max_tokens_limit=8)
    yield running
    running.stop()


def failures_of(event: events.ScenarioFinished) -> list[str]:
    return [f"{event.label} ({event.phase.name}): {check.name}: {check.failure_info.failure.title}\n"
            f"    {check.failure_info.code_sample}"
            for checks in event.recorder.checks.values() for check in checks if check.failure_info]


def test_every_operation_answers_generated_requests_as_its_document_says(fuzz_server: RunningServer):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json",
                                           config=schemathesis.Config.from_str(FUZZ_CONFIG))
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in schema.get_all_operations())}
    tested, failures = set(), []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.status != Status.SKIP:
            tested.add(event.label)
            failures += failures_of(event)
            if event.status == Status.ERROR and not failures_of(event):
                failures.append(f"{event.label} ({event.phase.name}): error")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{getattr(event, 'label', '')}: {event.value!r}"
                            if hasattr(event, "value") else repr(event))
    assert not failures, "\n".join(failures)
    assert operations <= tested
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= operations
    assert_nothing_left_in_flight(fuzz_server)


def assert_nothing_left_in_flight(fuzz_server: RunningServer) -> None:
    """Every request the fuzzer sent has let go of its slot, and the server still answers."""
    deadline = time.monotonic() + 30
    while fuzz_server.serving.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuzz_server.serving.num_in_flight == 0
    with fuzz_server.http() as http:
        assert http.get("/health").status_code == 200


def test_openapi_document_declares_errors_in_openai_shape_never_422(http: httpx.Client):
    doc = http.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["components"]["schemas"]["ErrorInfo"]["required"]) == {"message", "type", "param", "code"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            if "requestBody" in operation:
                assert {"400", "413"} <= set(operation["responses"]), (method, path)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


# --- what the fuzzer found ----------------------------------------------------------------


def test_completions_logprobs_false_is_400_not_zero_alternatives(http: httpx.Client):
    # pydantic's lax mode read false as 0 and answered with logprobs nobody asked for
    assert_error(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "logprobs": False}), 400,
                 "logprobs")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "max_tokens": "2"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": "1"}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stream": 1}, "stream"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": 0}, "add_generation_prompt"),
    ("/detokenize", {"tokens": ["1"]}, "tokens[0]"),
])
def test_values_of_the_wrong_json_type_are_400_not_coerced(http: httpx.Client, path, body, param):
    assert_error(http.post(path, json=body), 400, param)


def test_chat_tools_must_be_a_list_to_be_empty(http: httpx.Client):
    body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json={**body, "tools": []}).status_code == 200
    assert_error(http.post("/v1/chat/completions", json={**body, "tools": {}}), 400, "tools")
    assert_error(http.post("/v1/chat/completions", json={**body, "tools": 0}), 400, "tools")
