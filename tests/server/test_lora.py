"""LoRA adapters over HTTP: chosen by `model`, listed by /v1/models, loaded and unloaded at
run time through vLLM's endpoints (behind the API key, only when enabled), with the
official openai client, as users call them."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.engine.test_lora import peft_greedy
from tests.server.conftest import API_KEY, MODEL_NAME, start_server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, make_adapter) -> dict:
    return {"sql": make_adapter(tiny_checkpoint, seed=1),
            "poet": make_adapter(tiny_checkpoint, seed=2, r=4, target_modules=["c_attn"], use_rslora=True),
            "late": make_adapter(tiny_checkpoint, seed=3, r=2, lora_alpha=32)}


@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint, adapters):
    """The default precision, two adapters named at start, runtime updates on, a key."""
    running = start_server(tiny_checkpoint, {"lora_modules": {k: str(adapters[k]) for k in ("sql", "poet")},
                                             "max_loras": 2},
                           api_key=API_KEY, enable_lora_runtime_updates=True)
    yield running
    running.stop()


def complete(client: openai.OpenAI, model: str, max_tokens: int = 8, prompt=PROMPT):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_each_adapter_answers_as_peft_does(tiny_checkpoint, adapters):
    running = start_server(tiny_checkpoint, {"dtype": "float32", "lora_modules": {"sql": str(adapters["sql"])}})
    try:
        prompt = running.serving.tokenizer.encode(PROMPT)
        answer = complete(running.client(), "sql", prompt=prompt)
        expected = peft_greedy(tiny_checkpoint, adapters["sql"], prompt, merged=False, n=8)
        assert answer.model == "sql"
        assert answer.choices[0].text == running.serving.tokenizer.decode(expected)
    finally:
        running.stop()


def test_models_lists_the_model_and_its_adapters(lora_server, adapters):
    models = {m.id: m for m in lora_server.client().models.list().data}
    assert list(models) == [MODEL_NAME, "sql", "poet"]
    assert models["sql"].model_extra["parent"] == MODEL_NAME
    assert models["sql"].model_extra["root"] == str(adapters["sql"])
    assert lora_server.client().models.retrieve("poet").id == "poet"


def test_the_adapter_named_by_model_generates_and_the_answer_names_it(lora_server):
    client = lora_server.client()
    answers = {model: complete(client, model) for model in (MODEL_NAME, "sql", "poet")}
    assert {a.model for a in answers.values()} == {MODEL_NAME, "sql", "poet"}
    assert len({a.choices[0].text for a in answers.values()}) == 3  # each adapter changes the answer
    chat = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "sql"
    with client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        stream=True) as stream:
        assert {chunk.model for chunk in stream} == {"poet"}


def test_an_unknown_model_is_a_404_naming_what_exists(lora_server):
    with pytest.raises(openai.NotFoundError) as e:
        complete(lora_server.client(), "nope")
    assert e.value.body["code"] == "model_not_found"
    assert f"{MODEL_NAME}, sql, poet" in e.value.body["message"]


def test_embeddings_of_an_adapter_are_refused(lora_server):
    with pytest.raises(openai.BadRequestError, match="LoRA adapter"):
        lora_server.client().embeddings.create(model="sql", input="hello")


def test_load_and_unload_need_the_key(lora_server, adapters):
    with lora_server.http() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["late"])})
        assert r.status_code == 401


def test_load_serve_unload_and_reload(lora_server, adapters):
    client, headers = lora_server.client(), {"Authorization": f"Bearer {API_KEY}"}
    with lora_server.http(headers=headers) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["late"])})
        assert r.status_code == 200 and "added successfully" in r.text
        first = complete(client, "late").choices[0].text
        assert "late" in [m.id for m in client.models.list().data]
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
        assert r.status_code == 200 and "removed successfully" in r.text
        with pytest.raises(openai.NotFoundError):
            complete(client, "late")
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["late"])})
        assert r.status_code == 200
        assert complete(client, "late").choices[0].text == first
        http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})


@pytest.mark.parametrize("body, status, words", [
    ({"lora_name": "sql", "lora_path": "."}, 400, "already in use"),
    ({"lora_name": MODEL_NAME, "lora_path": "."}, 400, "already in use"),
    ({"lora_name": "new", "lora_path": "/no/such/folder"}, 400, "no adapter folder"),
    ({"lora_name": "new"}, 400, "lora_path"),
    ({"lora_name": "", "lora_path": "."}, 400, "lora_name"),
], ids=["taken", "the-model's-name", "missing-folder", "no-path", "empty-name"])
def test_bad_loads_are_400s(lora_server, body, status, words):
    with lora_server.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert [m.id for m in lora_server.client().models.list().data] == [MODEL_NAME, "sql", "poet"]


def test_a_bad_adapter_file_is_a_400(lora_server, adapters, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(adapters["late"], folder)
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with lora_server.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "corrupt", "lora_path": str(folder)})
    assert r.status_code == 400 and "cannot read adapter_model.safetensors" in r.json()["error"]["message"]


def test_unloading_an_unknown_adapter_is_a_404(lora_server):
    with lora_server.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "never"})
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"]


def test_the_endpoints_are_absent_unless_enabled(server):
    with server.http() as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "."}).status_code == 404


def test_an_adapter_unloaded_mid_stream_finishes_its_stream(lora_server, adapters):
    client, headers = lora_server.client(), {"Authorization": f"Bearer {API_KEY}"}
    with lora_server.http(headers=headers) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["late"])}
                         ).status_code == 200
        expected = complete(client, "late", max_tokens=40).choices[0].text
        stream = client.completions.create(model="late", prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        text = next(iter(stream)).choices[0].text
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        text += "".join(chunk.choices[0].text for chunk in stream)
    assert text == expected
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")


async def test_loading_and_unloading_under_traffic_disturbs_no_other_request(lora_server, adapters):
    client = lora_server.async_client()
    expected = {m: complete(lora_server.client(), m).choices[0].text for m in (MODEL_NAME, "sql", "poet")}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def traffic(model):
        answer = await client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True})
        return model, answer.choices[0].text

    async def churn():
        import httpx

        async with httpx.AsyncClient(base_url=lora_server.base_url, headers=headers, timeout=60) as http:
            for _ in range(3):
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "late",
                                                                   "lora_path": str(adapters["late"])})
                assert r.status_code == 200
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
                assert r.status_code == 200

    results = await asyncio.gather(churn(), *(traffic(m) for m in [MODEL_NAME, "sql", "poet"] * 6))
    for model, text in results[1:]:
        assert text == expected[model]
