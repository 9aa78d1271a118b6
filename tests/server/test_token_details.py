"""`token_details` (ours) on chat completions: what the grammar allowed and forbade at each
generated token, and which tokens were confirmed speculative guesses; absent unless asked."""
from __future__ import annotations

import json

import pytest

from gptserve.config import SpeculativeConfig
from tests.server.conftest import start_server

SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}


def chat(http, **body) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "A city?"}],
                                                "max_tokens": 24, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_each_token_of_a_constrained_answer_says_what_the_grammar_allowed(server):
    client = server.client()
    answer = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "A city?"}],
                                            max_tokens=24, temperature=0, response_format=SCHEMA,
                                            extra_body={"token_details": True})
    json.loads(answer.choices[0].message.content)
    details = answer.choices[0].model_extra["token_details"]
    assert len(details) == answer.usage.completion_tokens
    vocab = server.serving.limits.vocab_size
    assert all(d["allowed_tokens"] is not None and 0 < d["allowed_tokens"] <= vocab for d in details)
    assert details[0]["allowed_tokens"] < vocab and details[0]["forbidden"]  # the first token must open the object
    assert all(f["logprob"] <= 0 and isinstance(f["token"], str) for d in details for f in d["forbidden"])


def test_without_a_grammar_nothing_is_forbidden(server):
    with server.http() as http:
        details = chat(http, token_details=True, max_tokens=4, ignore_eos=True)["choices"][0]["token_details"]
    assert len(details) == 4 and all(d == {"allowed_tokens": None, "forbidden": [], "guessed": False}
                                     for d in details)


def test_the_field_is_absent_unless_asked(server):
    with server.http() as http:
        assert "token_details" not in chat(http, response_format=SCHEMA)["choices"][0]
        events = server.sse("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 4, "stream": True})
    assert not any("token_details" in e for e in events[:-1])


def test_a_stream_carries_each_tokens_details(server):
    events = server.sse("/v1/chat/completions", {"messages": [{"role": "user", "content": "A city?"}],
                                                 "max_tokens": 24, "temperature": 0, "stream": True,
                                                 "response_format": SCHEMA, "token_details": True,
                                                 "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    details = [d for c in chunks for choice in c["choices"] for d in choice.get("token_details") or []]
    assert len(details) == chunks[-1]["usage"]["completion_tokens"]
    assert all(d["allowed_tokens"] for d in details)


@pytest.fixture(scope="module")
def ngram_server(tiny_checkpoint):
    running = start_server(tiny_checkpoint, {"speculative": SpeculativeConfig("ngram", max_batch=64)})
    yield running
    running.stop()


def test_tokens_from_confirmed_guesses_are_marked(ngram_server):
    with ngram_server.http() as http:
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "one two three four " * 8}], "max_tokens": 48,
            "temperature": 0, "ignore_eos": True, "token_details": True})
    guessed = [d["guessed"] for d in r.json()["choices"][0]["token_details"]]
    assert len(guessed) == 48 and any(guessed) and not all(guessed)
