"""Sampling settings at the edges of what is accepted are answered 200, with tokens of the
vocabulary and, under a grammar, text the grammar allows. The first three bodies are the
ones contract fuzzing found answered 500 (a token id past the vocabulary reached the
detokenizer; a token outside the grammar's mask was chosen)."""
from __future__ import annotations

import httpx
import pytest

TINY = 5e-324  # the smallest positive float

EDGES = [
    {"prompt": "hi", "temperature": 1e-300},
    {"prompt": "hi", "temperature": 1.0, "repetition_penalty": TINY},
    {"prompt": "hi", "temperature": 0, "repetition_penalty": TINY, "response_format": {"type": "json_object"}},
    {"prompt": "hi", "temperature": TINY, "top_p": TINY, "min_p": 1.0, "top_k": 1},
    {"prompt": "hi", "temperature": 2.0, "top_k": 10**9, "repetition_penalty": 10.0, "presence_penalty": 2.0,
     "frequency_penalty": -2.0, "logit_bias": {"50256": 100, "0": -100}, "logprobs": 5},
    {"prompt": "hi", "temperature": 1.0, "repetition_penalty": TINY, "presence_penalty": -2.0,
     "logit_bias": {"90": -100, "1": 100}, "top_p": TINY, "response_format": {"type": "json_object"}, "n": 2,
     "seed": 5, "logprobs": 3},
]


@pytest.mark.parametrize("body", EDGES, ids=["temperature-1e-300", "repetition-penalty-5e-324",
                                             "json-object-repetition-penalty-5e-324", "all-tiny",
                                             "all-at-their-largest", "json-object-everything-at-once"])
def test_edge_settings_are_answered_with_vocabulary_tokens(http: httpx.Client, body: dict):
    response = http.post("/v1/completions", json={"max_tokens": 12, **body})
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        if "response_format" in body:  # an object is opened first, whatever else favours
            assert choice["text"].lstrip().startswith("{")
        if body.get("logprobs"):
            assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
