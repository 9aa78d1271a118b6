"""The Ray application serves as `gptserve serve` does: the same API, errors, key and
playground, answers equal to a single server's, requests spread over the replicas, each
response naming its replica."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import openai
import pytest

from tests.deploy.conftest import NUM_REPLICAS, RayApp
from tests.server.conftest import MODEL_NAME, RunningServer, start_server

PROMPTS = [f"Request {i} asks about the weather in city number {i}." for i in range(8)]


@pytest.fixture(scope="module")
def single_server(replica_checkpoint: Path) -> Iterator[RunningServer]:
    running = start_server(replica_checkpoint, {"dtype": "float32"})  # as the application's engines (conftest.py)
    yield running
    running.stop()


def test_requests_spread_over_both_replicas(ray_app: RayApp):
    with ray_app.http() as http:
        replicas = {http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": p, "max_tokens": 2}
                              ).headers["x-gptserve-replica"] for p in PROMPTS}
    assert len(replicas) == NUM_REPLICAS and all(r.startswith("GptServeEngine#") for r in replicas)


def test_greedy_outputs_equal_a_single_servers(ray_app: RayApp, single_server: RunningServer):
    for prompt in PROMPTS[:4]:
        body = dict(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
        ours = ray_app.client().chat.completions.create(**body)
        theirs = single_server.client().chat.completions.create(**body)
        assert ours.choices[0].message.content == theirs.choices[0].message.content
        assert ours.usage.completion_tokens == theirs.usage.completion_tokens


def test_a_stream_is_the_same_sse_with_done(ray_app: RayApp):
    with ray_app.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["x-gptserve-replica"].startswith("GptServeEngine#")
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"


def test_the_api_key_is_required(ray_app: RayApp):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{ray_app.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_engine_errors_keep_their_status_and_shape(ray_app: RayApp):
    with pytest.raises(openai.BadRequestError) as e:
        ray_app.client().completions.create(model=MODEL_NAME, prompt="word " * 1100, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"


def test_embeddings_and_models_answer(ray_app: RayApp):
    client = ray_app.client()
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    vectors = client.embeddings.create(model=MODEL_NAME, input=["one", "two"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) == 64


def test_the_playground_and_metrics_are_served(ray_app: RayApp):
    with ray_app.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert page.headers["x-gptserve-replica"].startswith("GptServeIngress#")  # no engine replica answered
    assert ray_app.metric("gptserve_engine_replicas") == NUM_REPLICAS
    assert ray_app.metric("gptserve_kv_blocks_total") > 0  # summed over the replicas' reports


def test_the_request_id_comes_back_once(ray_app: RayApp):
    with ray_app.http() as http:
        response = http.get("/v1/models", headers={"x-request-id": "trace-42"})
    assert response.headers.get_list("x-request-id") == ["trace-42"]
