"""/v1/models, /health, /metrics, /tokenize and /detokenize."""
from __future__ import annotations

import httpx
import openai

from tests.conftest import prometheus_value


def test_models_lists_the_served_model_name(client: openai.OpenAI):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-gpt2"]
    assert models.data[0].object == "model"


def test_model_can_be_retrieved_by_name(client: openai.OpenAI):
    assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"


def test_model_card_carries_the_context_length(http: httpx.Client):
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 256


def test_health_is_200_when_ready(http: httpx.Client):
    assert http.get("/health").status_code == 200


def test_metrics_expose_engine_and_latency_series(http: httpx.Client):
    http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    text = http.get("/metrics").text
    for name in ("gptserve_num_requests_running", "gptserve_num_requests_waiting", "gptserve_kv_blocks_used",
                 "gptserve_kv_blocks_total", "gptserve_prefix_cache_hit_rate",
                 "gptserve_time_to_first_token_seconds_bucket", "gptserve_inter_token_latency_seconds_bucket",
                 "gptserve_prompt_tokens_total", "gptserve_generation_tokens_total"):
        assert f"\n{name}" in text, name
    assert prometheus_value(text, "gptserve_kv_blocks_total") > 0
    assert prometheus_value(text, "gptserve_generation_tokens_total") >= 3


def test_metrics_carry_the_gateway_inference_extension_gauges(http: httpx.Client):
    """An endpoint picker (Gateway API Inference Extension, llm-d) reads these by vLLM's names."""
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert f"# TYPE {name} gauge" in text and prometheus_value(text, name) >= 0
    usage = prometheus_value(text, "vllm:kv_cache_usage_perc")
    assert usage == prometheus_value(text, "gptserve_kv_blocks_used") / prometheus_value(text, "gptserve_kv_blocks_total")



def test_tokenize_a_prompt(http: httpx.Client):
    body = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert body == {"count": 2, "max_model_len": 256, "tokens": [15496, 995], "token_strs": ["Hello", " world"]}


def test_tokenize_messages_renders_the_chat_template(http: httpx.Client):
    messages = [{"role": "user", "content": "Hi"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    assert "".join(body["token_strs"]) == "User: Hi\nAssistant:"
    assert body["count"] == len(body["tokens"])


def test_tokenize_messages_counts_the_prompt_tokens_of_a_chat(http: httpx.Client, client: openai.OpenAI):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    reply = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == count


def test_detokenize_inverts_tokenize(http: httpx.Client):
    tokens = http.post("/tokenize", json={"prompt": "A café, naïvely"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "A café, naïvely"}


def test_tokenize_needs_exactly_one_input(http: httpx.Client):
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "a", "messages": []}).status_code == 400


def test_cors_is_off_by_default(http: httpx.Client):
    response = http.get("/v1/models", headers={"Origin": "http://example.com"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_the_configured_origins(launch):
    running = launch(cors_allow_origins=["http://example.com"])
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with running.http() as http:
        response = http.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://example.com"
        other = http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
