"""HEAD on every GET route: GET's status and headers, no body; nothing else changes."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY

GET_ROUTES = ["/health", "/metrics", "/v1/models", "/v1/models/tiny-gpt2", "/", "/tokenizer_info"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_as_get_does_without_the_body(http: httpx.Client, path: str):
    head, get = http.head(path), http.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers.get("content-type") == get.headers.get("content-type")
    if path != "/metrics":  # the counters move between the two calls
        assert int(head.headers["content-length"]) == len(get.content)


def test_head_gets_the_status_get_would_get(http: httpx.Client, server, monkeypatch):
    assert http.head("/v1/models/no-such-model").status_code == 404
    monkeypatch.setattr(server.serving.shared, "draining", True)
    assert http.head("/health").status_code == 503


def test_head_needs_the_api_key_as_get_does(keyed_server):
    with keyed_server.http() as http:
        assert http.head("/v1/models").status_code == 401
        assert http.head("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert http.head("/health").status_code == 200


def test_head_to_a_post_route_is_405(http: httpx.Client):
    assert http.head("/v1/chat/completions").status_code == 405


def test_the_openapi_document_lists_no_head_operations(http: httpx.Client):
    paths = http.get("/openapi.json").json()["paths"]
    assert "/tokenizer_info" in paths
    assert not [path for path, operations in paths.items() if "head" in operations]
