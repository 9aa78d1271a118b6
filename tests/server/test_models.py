"""Several models behind one server: chosen by `model`, listed with their state, loaded on
first use (or at start), unloaded least-recently-used under a memory budget or when idle,
reloaded on demand, each answering as it does alone; with the official openai client."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from gptserve.config import ModelSpec
from gptserve.engine.data_parallel import EngineLoader
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.models import ModelCatalog
from tests.conftest import prometheus_value
from tests.server.conftest import RunningServer, serve, server_engine_config

PROMPT = "The quick brown fox"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint) -> dict:
    """Two different models (other weights, other depth) and a third like the first."""
    return {"alpha": make_checkpoint(seed=0), "beta": make_checkpoint(seed=1, n_layer=3),
            "gamma": make_checkpoint(seed=2)}


def specs(checkpoints: dict, **engine) -> list[ModelSpec]:
    return [ModelSpec(name, str(folder), server_engine_config(**engine)) for name, folder in checkpoints.items()]


def serve_models(checkpoints: dict, engine: dict | None = None, **server_settings) -> RunningServer:
    return serve(ModelCatalog(specs(checkpoints, **(engine or {})), EngineLoader()), **server_settings)


def alone(folder, prompt_ids: list[int]) -> list[int]:
    """The model's greedy tokens, run by itself in an engine of the same settings."""
    engine = LLMEngine(str(folder), server_engine_config())
    return engine.generate([prompt_ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))[0][0]


def complete(client: openai.OpenAI, model: str, max_tokens: int = NEW_TOKENS):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True})


def states(running: RunningServer) -> dict[str, str]:
    return {m.id: m.model_extra["state"] for m in running.client().models.list().data}


def one_model_memory(checkpoints: dict) -> int:
    return EngineLoader().estimate(specs(checkpoints)[0])


@pytest.fixture(scope="module")
def two_models(checkpoints):
    running = serve_models({k: checkpoints[k] for k in ("alpha", "beta")})
    yield running
    running.stop()


def test_models_are_listed_with_their_state_and_load_on_first_use(checkpoints):
    running = serve_models({k: checkpoints[k] for k in ("alpha", "beta")})
    try:
        assert httpx.get(running.base_url + "/health").status_code == 200  # up before any model is loaded
        assert states(running) == {"alpha": "unloaded", "beta": "unloaded"}
        complete(running.client(), "beta")
        assert states(running) == {"alpha": "unloaded", "beta": "loaded"}
        assert running.client().models.retrieve("beta").model_extra["max_model_len"] == 256
    finally:
        running.stop()


def test_each_model_answers_as_it_does_alone(two_models, checkpoints):
    client = two_models.client()
    tokenizer = LLMEngine(str(checkpoints["alpha"]), server_engine_config()).tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    answers = {}
    for name in ("alpha", "beta"):
        answer = complete(client, name)
        assert answer.model == name
        assert answer.choices[0].text == tokenizer.decode(alone(checkpoints[name], prompt_ids))
        answers[name] = answer.choices[0].text
    assert answers["alpha"] != answers["beta"]


async def test_both_models_serve_at_once(two_models):
    expected = {name: complete(two_models.client(), name).choices[0].text for name in ("alpha", "beta")}
    client = two_models.async_client()

    async def ask(name):
        answer = await client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                                 extra_body={"ignore_eos": True})
        return name, answer.choices[0].text

    for name, text in await asyncio.gather(*(ask(n) for n in ["alpha", "beta"] * 6)):
        assert text == expected[name]


def test_a_request_without_a_model_goes_to_the_first(two_models):
    with two_models.http() as http:
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "alpha"


def test_an_unknown_model_is_a_404_naming_the_models(two_models):
    with pytest.raises(openai.NotFoundError) as e:
        complete(two_models.client(), "delta")
    assert "alpha, beta" in e.value.body["message"]
    with two_models.http() as http:
        r = http.post("/v1/messages", json={"model": "delta", "max_tokens": 4,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["type"] == "error"  # in the Messages API's own shape


def test_metrics_carry_each_models_name(two_models):
    for name in ("alpha", "beta"):
        complete(two_models.client(), name)
    with two_models.http() as http:
        text = http.get("/metrics").text
    for name in ("alpha", "beta"):
        assert prometheus_value(text, "gptserve_kv_blocks_total", model_name=name) > 0
        assert prometheus_value(text, "gptserve_time_to_first_token_seconds_count", model_name=name) > 0


def test_each_model_has_its_own_tokenizer_endpoints(two_models):
    with two_models.http() as http:
        r = http.post("/tokenize", json={"model": "beta", "prompt": "Hello world"})
        assert r.status_code == 200 and r.json()["count"] == 2
        assert http.get("/tokenizer_info", params={"model": "beta"}).status_code == 200


def test_a_small_budget_unloads_the_least_recently_used_and_reloads_it(checkpoints):
    running = serve_models(checkpoints, models_memory=int(1.5 * one_model_memory(checkpoints)))
    try:
        client = running.client()
        first = {name: complete(client, name).choices[0].text for name in ("alpha", "beta", "gamma")}
        assert states(running) == {"alpha": "unloaded", "beta": "unloaded", "gamma": "loaded"}
        assert complete(client, "alpha").choices[0].text == first["alpha"]  # reloaded, same answer
        assert states(running) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
    finally:
        running.stop()


async def test_under_a_small_budget_requests_for_every_model_all_succeed(checkpoints):
    running = serve_models(checkpoints, models_memory=int(1.5 * one_model_memory(checkpoints)))
    try:
        expected = {name: complete(running.client(), name).choices[0].text for name in checkpoints}
        client = running.async_client()

        async def ask(name, delay):
            await asyncio.sleep(delay)
            answer = await client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                                     temperature=0, extra_body={"ignore_eos": True})
            return name, answer.choices[0].text

        asks = [ask(name, 0.05 * i) for i, name in enumerate(list(checkpoints) * 4)]
        for name, text in await asyncio.gather(*asks):
            assert text == expected[name]
        assert sum(m.loads for m in running.models.models.values()) > len(checkpoints)  # they took turns
    finally:
        running.stop()


def test_a_model_that_cannot_load_in_time_is_a_503_with_retry_after(checkpoints):
    running = serve_models(checkpoints, models_memory=int(1.5 * one_model_memory(checkpoints)),
                           model_load_timeout=0.5)
    try:
        client = running.client()
        stream = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # alpha is busy: beta can't have its memory
        with running.http() as http:
            r = http.post("/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "still loading" in r.json()["error"]["message"]
        assert sum(1 for _ in stream) > 0  # alpha's stream was not disturbed
        deadline = time.monotonic() + 30
        while True:  # once alpha is idle, beta's load (which went on) finishes
            with running.http() as http:
                r = http.post("/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 2})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200
    finally:
        running.stop()


def test_an_idle_model_is_unloaded(checkpoints):
    running = serve_models({"alpha": checkpoints["alpha"]}, idle_unload=0.5)
    try:
        complete(running.client(), "alpha")
        deadline = time.monotonic() + 20
        while states(running)["alpha"] != "unloaded":
            assert time.monotonic() < deadline, "not unloaded"
            time.sleep(0.1)
        assert complete(running.client(), "alpha").model == "alpha"  # and loads again
    finally:
        running.stop()


def test_preload_loads_every_model_at_start(checkpoints):
    running = serve_models({k: checkpoints[k] for k in ("alpha", "beta")}, preload=True)
    try:
        assert states(running) == {"alpha": "loaded", "beta": "loaded"}
    finally:
        running.stop()


def test_a_models_adapters_are_served_by_name_and_load_their_model(checkpoints, make_adapter):
    folder = make_adapter(checkpoints["beta"], seed=7)
    catalog = specs({k: checkpoints[k] for k in ("alpha", "beta")})
    catalog[1].engine.lora_modules = {"beta-sql": str(folder)}
    running = serve(ModelCatalog(catalog, EngineLoader()))
    try:
        models = {m.id: m for m in running.client().models.list().data}
        assert models["beta-sql"].model_extra["parent"] == "beta"
        answer = complete(running.client(), "beta-sql")
        assert answer.model == "beta-sql" and states(running)["beta"] == "loaded"
        assert answer.choices[0].text != complete(running.client(), "beta").choices[0].text
    finally:
        running.stop()


def test_a_stored_response_knows_its_model(two_models):
    client = two_models.client()
    first = client.responses.create(model="beta", input="Hello", max_output_tokens=4)
    assert client.responses.retrieve(first.id).model == "beta"
    follow_up = client.responses.create(model="alpha", input="And?", previous_response_id=first.id,
                                        max_output_tokens=4)
    assert follow_up.model == "alpha"


def test_a_continued_conversation_that_names_no_model_stays_with_its_model(two_models):
    with two_models.http() as http:
        first = http.post("/v1/responses", json={"model": "beta", "input": "Hello", "max_output_tokens": 4}).json()
        follow_up = http.post("/v1/responses", json={"input": "And?", "previous_response_id": first["id"],
                                                     "max_output_tokens": 4}).json()
        fresh = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4}).json()
    assert follow_up["model"] == "beta"
    assert fresh["model"] == "alpha"  # no conversation: the first model
