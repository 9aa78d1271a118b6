"""POST /v1/inspect: the serving model's own attention weights and next-token
probabilities for a prompt, equal to transformers' on the same checkpoint; prompts the
heatmap can't draw are refused by name."""
from __future__ import annotations

import pytest
import torch

from gptserve.server.inspect import MAX_INSPECT_TOKENS
from tests.server.conftest import API_KEY

PROMPT = "The quick brown fox jumps over the lazy dog because it"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """transformers' GPT-2 on the same folder, with eager attention so that it returns weights."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def inspection(float32_server) -> dict:
    """The inspection of PROMPT at float32, as transformers computes it."""
    with float32_server.http() as http:
        response = http.post("/v1/inspect", json={"prompt": PROMPT, "top_k": 20})
    assert response.status_code == 200, response.text
    return response.json()


def reference_outputs(reference, token_ids: list[int]):
    with torch.no_grad():
        out = reference(torch.tensor([token_ids]), output_attentions=True)
    return [a[0] for a in out.attentions], out.logits[0, -1]  # [layer] (H, T, T), (V,)


def test_answer_has_the_prompts_tokens_and_the_models_shape(inspection, float32_server, http):
    tokenized = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert inspection["tokens"] == tokenized["tokens"]
    assert inspection["token_strs"] == tokenized["token_strs"]
    config = float32_server.serving.engine.model_config
    assert (inspection["n_layer"], inspection["n_head"]) == (config.n_layer, config.n_head)
    T = len(inspection["tokens"])
    attention = torch.tensor(inspection["attention"])
    assert attention.shape == (config.n_layer, config.n_head, T, T)
    assert inspection["model"] == float32_server.model_name


def test_attention_rows_are_probabilities_over_the_past_only(inspection):
    attention = torch.tensor(inspection["attention"], dtype=torch.float64)
    T = attention.shape[-1]
    above_diagonal = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert (attention[..., above_diagonal] == 0).all()
    assert (attention >= 0).all()
    # each weight is rounded to 4 decimals: a row's sum may be off by half a unit per weight
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1], dtype=torch.float64),
                               atol=T * 5e-5, rtol=0)


def test_attention_equals_transformers_output_attentions(inspection, reference):
    expected, _ = reference_outputs(reference, inspection["tokens"])
    for layer, weights in enumerate(inspection["attention"]):
        torch.testing.assert_close(torch.tensor(weights), expected[layer].float(), atol=1e-4, rtol=0)


def test_top_next_tokens_are_the_softmax_of_transformers_last_logits(inspection, reference):
    _, logits = reference_outputs(reference, inspection["tokens"])
    probs, ids = logits.float().softmax(-1).topk(20)
    top = inspection["top_next_tokens"]
    assert [t["id"] for t in top] == ids.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in top]), probs, atol=1e-6, rtol=1e-4)
    assert all(isinstance(t["token"], str) for t in top)


def test_top_k_defaults_to_ten(http):
    answer = http.post("/v1/inspect", json={"prompt": "Hello"}).json()
    assert len(answer["top_next_tokens"]) == 10
    assert answer["tokens"] and len(answer["attention"][0][0]) == len(answer["tokens"])


def test_a_prompt_of_exactly_the_limit_is_drawn(http):
    prompt = "a" + " a" * (MAX_INSPECT_TOKENS - 1)  # " a" is one token
    response = http.post("/v1/inspect", json={"prompt": prompt, "top_k": 1})
    assert response.status_code == 200, response.text
    assert len(response.json()["tokens"]) == MAX_INSPECT_TOKENS


def test_a_longer_prompt_is_refused_naming_the_limit(http):
    prompt = "a" + " a" * MAX_INSPECT_TOKENS
    response = http.post("/v1/inspect", json={"prompt": prompt})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "prompt"
    assert str(MAX_INSPECT_TOKENS) in error["message"] and str(MAX_INSPECT_TOKENS + 1) in error["message"]


def test_an_empty_prompt_is_refused(http):
    response = http.post("/v1/inspect", json={"prompt": ""})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "empty" in error["message"]


@pytest.mark.parametrize("body, param", [({}, "prompt"), ({"prompt": ["a"]}, "prompt"),
                                         ({"prompt": "a", "top_k": 21}, "top_k"),
                                         ({"prompt": "a", "top_k": 0}, "top_k")])
def test_a_malformed_body_is_a_400_naming_the_field(http, body, param):
    response = http.post("/v1/inspect", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404(http):
    response = http.post("/v1/inspect", json={"prompt": "Hi", "model": "gpt-4"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_inspect_needs_the_api_key_when_the_server_has_one(keyed_server):
    with keyed_server.http() as http:
        assert http.post("/v1/inspect", json={"prompt": "Hi"}).status_code == 401
        authorized = http.post("/v1/inspect", json={"prompt": "Hi"}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert authorized.status_code == 200, authorized.text


def test_inspect_takes_a_queue_slot_and_gives_it_back(single_slot_server):
    serving = single_slot_server.serving
    with single_slot_server.http() as http:
        assert http.post("/v1/inspect", json={"prompt": "Hi"}).status_code == 200
        assert serving.num_in_flight == 0
        serving.shared.num_in_flight += 1  # the only slot, taken as a generation would
        try:
            response = http.post("/v1/inspect", json={"prompt": "Hi"})
        finally:
            serving.shared.num_in_flight -= 1
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
