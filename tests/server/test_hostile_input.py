"""Hostile input on the newer routes (Responses, Anthropic Messages, embeddings, the token
routes): each request gets a 4xx in its API's error shape, or is served; none gets a 5xx,
and the server keeps serving. (Pathological schemas, regexes, grammars and tool sets:
test_hostile_structured.py.)"""
from __future__ import annotations

import httpx
import pytest

from gptserve.server.errors import speaks_anthropic
from tests.server.conftest import RunningServer

BIG_TEXT = "word " * 300_000  # 1.5 MB: under the body limit, far over the context
USER = [{"role": "user", "content": "hi"}]
IMAGE = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}

HOSTILE = [
    # Responses: oversized and unsupported input
    ("/v1/responses", {"input": BIG_TEXT, "max_output_tokens": 4}),
    ("/v1/responses", {"input": [{"role": "user", "content": "x"}] * 20_000, "max_output_tokens": 4}),
    ("/v1/responses", {"input": [{"type": "unknown_item"}], "max_output_tokens": 4}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}),
    ("/v1/responses", {"input": [{"type": "function_call_output", "call_id": "nobody", "output": "x"}] * 3}),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_" + "0" * 10_000}),
    ("/v1/responses", {"input": [], "max_output_tokens": 4}),
    # Anthropic Messages: block types it does not serve, and malformed ones
    *[("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [block]}]}) for block in [
        {"type": "no_such_block"},
        {"type": "image", "source": IMAGE},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}},
        {"type": "thinking", "thinking": "x", "signature": "s"},
        {"type": "redacted_thinking", "data": "x"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        {"type": "search_result", "source": "x", "title": "t", "content": []},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image", "source": IMAGE}]},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": "not an object"},
        {"type": "text"},
        {"type": "text", "text": BIG_TEXT},
    ]],
    ("/v1/messages", {"max_tokens": 4, "messages": USER, "system": [{"type": "image", "source": IMAGE}]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}] * 20_000}),
    ("/v1/messages", {"max_tokens": 4, "messages": []}),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": [{"type": "no_such_block"}]}]}),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": BIG_TEXT}]}),
    # embeddings: batches and token ids out of range
    ("/v1/embeddings", {"input": ["word"] * 20_000}),
    ("/v1/embeddings", {"input": [[99_999_999]]}),
    ("/v1/embeddings", {"input": [[-1]]}),
    ("/v1/embeddings", {"input": [[2**63]]}),
    ("/v1/embeddings", {"input": []}),
    ("/v1/embeddings", {"input": [[]]}),
    ("/v1/embeddings", {"input": [""]}),
    ("/v1/embeddings", {"input": BIG_TEXT}),
    ("/v1/embeddings", {"input": "hi", "dimensions": 10**9}),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "no_such_format"}),
    # completions, chat and the token routes: ids out of range, sizes past the limits
    ("/v1/completions", {"prompt": [50_257], "max_tokens": 2}),
    ("/v1/completions", {"prompt": [[1, 2], [2**40]], "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["hi"] * 10_000, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                                          "input_audio": {"data": "x"}}]}]}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "logit_bias": {str(2**40): 100}}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stop": ["x" * 100_000]}),
    ("/detokenize", {"tokens": [50_257]}),
    ("/detokenize", {"tokens": [-5]}),
    ("/tokenize", {"prompt": BIG_TEXT}),
]


def assert_client_error_or_served(response: httpx.Response, path: str) -> None:
    """A 2xx, or a 4xx in the route's API's error shape: never a 5xx."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code < 400:
        return
    body = response.json()
    if speaks_anthropic(path):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"]


@pytest.mark.parametrize("path,body", HOSTILE, ids=[f"{i}-{path}" for i, (path, _) in enumerate(HOSTILE)])
def test_hostile_request_is_a_client_error_or_served(server: RunningServer, path: str, body: dict):
    with server.http(timeout=120) as http:
        body = {"model": server.model_name, **body}
        assert_client_error_or_served(http.post(path, json=body), path)
        # and the server keeps serving
        served = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] in ("length", "stop")
