"""POST /v1/embeddings through the official client: one unit vector per input, the mean of
the model's final hidden states, equal to transformers' on the same weights."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.server.test_errors import assert_error


def reference(checkpoint, token_ids: list[int]) -> np.ndarray:
    """transformers' GPT2Model: last_hidden_state (after ln_f), mean over tokens, unit length."""
    from transformers import GPT2Model

    model = GPT2Model.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()


def test_an_embedding_equals_transformers_mean_pooled_hidden_states(float32_server, tiny_checkpoint):
    client = float32_server.client()
    text = "In the beginning God created the heaven and the earth."
    answer = client.embeddings.create(model="tiny-gpt2", input=text, encoding_format="float")
    [item] = answer.data
    assert item.index == 0 and len(item.embedding) == 64
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": text}).json()["tokens"]
    np.testing.assert_allclose(item.embedding, reference(tiny_checkpoint, ids), atol=1e-4)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == len(ids)


def test_a_batch_of_texts_and_token_ids_gives_one_vector_each_in_order(client: openai.OpenAI):
    texts = ["light", "darkness", "light"]
    answer = client.embeddings.create(model="tiny-gpt2", input=texts, encoding_format="float")
    vectors = [np.array(d.embedding) for d in sorted(answer.data, key=lambda d: d.index)]
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    by_ids = client.embeddings.create(model="tiny-gpt2", input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert len(by_ids.data) == 2 and by_ids.usage.prompt_tokens == 5


def test_base64_is_the_same_vector_as_floats(http: httpx.Client):
    body = {"input": "Let there be light", "model": "tiny-gpt2"}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()["data"][0]["embedding"]
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(packed), dtype="<f4"), floats, atol=1e-6)


def test_the_official_clients_default_format_decodes(client: openai.OpenAI):
    """The client asks for base64 by default and decodes it to floats."""
    vector = client.embeddings.create(model="tiny-gpt2", input="Amen").data[0].embedding
    assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[1, 10**6]]}, "input"),
    ({"input": [7] * 300}, "input"),  # longer than the tiny model's 256-token context
    ({"input": "a", "dimensions": 8}, "dimensions"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
])
def test_bad_input_is_400_naming_it(http: httpx.Client, body: dict, param: str):
    assert_error(http.post("/v1/embeddings", json={"model": "tiny-gpt2", **body}), 400, param)
