"""GET /tokenizer_info, special tokens in /tokenize, and the calls lm-evaluation-harness's
remote tokenizer makes (its RemoteTokenizer and check_remote_tokenizer_support)."""
from __future__ import annotations

import httpx
import pytest
from jinja2 import BaseLoader, Environment, StrictUndefined

from gptserve.server.chat_template import DEFAULT_CHAT_TEMPLATE
from tests.server.conftest import API_KEY

EOS = "<|endoftext|>"


def test_tokenizer_info_describes_the_tokenizer_as_tokenizer_config_json_does(http: httpx.Client):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    assert (info["eos_token"], info["eos_token_id"]) == (EOS, 50256)
    assert (info["bos_token"], info["bos_token_id"]) == (EOS, 50256)
    assert info["pad_token"] is None and info["add_bos_token"] is False
    assert info["model_max_length"] == 256 and info["vocab_size"] == 50257
    assert info["chat_template"] == DEFAULT_CHAT_TEMPLATE


def test_the_chat_template_renders_for_clients_as_it_does_on_the_server(http: httpx.Client):
    """lm-eval renders it with a strict Jinja environment and only messages and add_generation_prompt."""
    template = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True).from_string(
        http.get("/tokenizer_info").json()["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    served = http.post("/tokenize", json={"messages": messages}).json()["token_strs"]
    assert template.render(messages=messages, add_generation_prompt=True) == "".join(served)


def test_tokenizer_info_needs_the_api_key(keyed_server):
    with keyed_server.http() as http:
        assert http.get("/tokenizer_info").status_code == 401
        assert http.get("/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_a_special_token_in_a_prompt_stays_text_unless_allowed(http: httpx.Client):
    plain = http.post("/tokenize", json={"prompt": f"a{EOS}b"}).json()["tokens"]
    assert 50256 not in plain and len(plain) > 3
    for allowed in ([EOS], "all"):
        special = http.post("/tokenize", json={"prompt": f"a{EOS}b", "allowed_special": allowed}).json()
        assert special["tokens"] == [64, 50256, 65]
        assert special["token_strs"] == ["a", EOS, "b"]


def test_allowing_a_special_token_the_vocabulary_lacks_is_400(http: httpx.Client):
    response = http.post("/tokenize", json={"prompt": "a", "allowed_special": ["<|im_start|>"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "allowed_special"
    assert "<|im_start|>" in response.json()["error"]["message"]


@pytest.mark.parametrize("text", ["The quick brown fox.", "  spaces,\ttabs\nand café ☕"])
def test_lm_eval_remote_tokenizer_round_trips_through_tokenize_and_detokenize(http: httpx.Client, text: str):
    info = http.get("/tokenizer_info").json()
    assert "eos_token" in info  # what check_remote_tokenizer_support looks for
    tokens = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == text
