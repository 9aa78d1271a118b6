"""POST /v1/completions: prompts as text or token ids, echo, legacy logprobs, streaming."""
from __future__ import annotations

import json

import openai
import pytest
import torch

from tests.server.test_concurrency import kv_blocks_used, wait_until

FIXED = {"ignore_eos": True}  # random weights: without it a completion may end at any token


def complete(client: openai.OpenAI, **kwargs):
    args = {"model": "tiny-gpt2", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
            "extra_body": FIXED}
    return client.completions.create(**{**args, **kwargs})


def test_completion_is_a_text_completion_with_usage(client: openai.OpenAI):
    reply = complete(client)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    assert choice.logprobs is None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 8)


def test_default_max_tokens_is_sixteen(client: openai.OpenAI):
    reply = client.completions.create(model="tiny-gpt2", prompt="Hi", temperature=0, extra_body=FIXED)
    assert reply.usage.completion_tokens == 16


def test_token_id_prompt_equals_its_text(client: openai.OpenAI, http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    assert complete(client, prompt=ids).choices[0].text == complete(client).choices[0].text


def test_each_prompt_of_a_batch_gets_n_choices_in_order(client: openai.OpenAI):
    prompts = ["Once upon a time", "The weather today"]
    reply = complete(client, prompt=prompts, n=2, max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == complete(client, max_tokens=3).choices[0].text
    assert reply.choices[2].text == complete(client, prompt=prompts[1], max_tokens=3).choices[0].text
    assert reply.usage.completion_tokens == 12


def test_batch_of_token_id_prompts(client: openai.OpenAI):
    reply = complete(client, prompt=[[464, 3290], [40, 588, 11]], max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.prompt_tokens == 5


def test_echo_puts_the_prompt_before_the_completion(client: openai.OpenAI):
    plain = complete(client).choices[0].text
    assert complete(client, echo=True).choices[0].text == "Once upon a time" + plain


def test_logprobs_come_in_the_legacy_format(client: openai.OpenAI):
    reply = complete(client, max_tokens=4, logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 2 <= len(top) <= 3  # the alternatives, and the chosen token
        assert top[token] == logprob


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI):
    lp = complete(client, max_tokens=2, logprobs=1, echo=True).choices[0].logprobs
    assert lp.tokens[:4] == ["Once", " upon", " a", " time"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[:5] == [0, 4, 9, 11, 16]


def test_streamed_text_equals_unstreamed_text(client: openai.OpenAI):
    whole = complete(client, max_tokens=12).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in complete(client, max_tokens=12, stream=True)
                       if chunk.choices)
    assert streamed == whole


def test_stream_ends_with_finish_reason_usage_and_done(server):
    body = {"prompt": "Once upon a time", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, **FIXED}
    events = server.sse("/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_streamed_echo_and_logprobs_equal_unstreamed(client: openai.OpenAI):
    whole = complete(client, echo=True, logprobs=1).choices[0]
    text, tokens, offsets = "", [], []
    for chunk in complete(client, echo=True, logprobs=1, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset


def test_empty_prompt_starts_a_new_document(client: openai.OpenAI):
    reply = complete(client, prompt="", max_tokens=2)
    assert reply.usage.prompt_tokens == 1  # <|endoftext|>
    assert reply.choices[0].finish_reason == "length"


# --- scoring a prompt: echo, logprobs and max_tokens 0 (lm-evaluation-harness' loglikelihood) ---

SCORED = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


def reference_logprobs(reference, ids: list[int]) -> list[float]:
    """transformers' logprob of each token after the first, given the ones before it."""
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, t]) for i, t in enumerate(ids) if i]


def score(client: openai.OpenAI, **kwargs):
    args = {"model": "tiny-gpt2", "prompt": SCORED, "max_tokens": 0, "echo": True, "logprobs": 1}
    return client.completions.create(**{**args, **kwargs})


def test_echo_and_max_tokens_0_score_the_prompt_as_transformers_does(float32_server, reference):
    with float32_server.http() as http:
        ids = http.post("/tokenize", json={"prompt": SCORED}).json()["tokens"]
    reply = score(float32_server.client())
    [choice] = reply.choices
    assert choice.text == SCORED and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert "".join(lp.tokens) == SCORED and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before it
    assert lp.token_logprobs[1:] == pytest.approx(reference_logprobs(reference, ids), abs=1e-4)
    assert all(top[token] == logprob for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                                                     lp.top_logprobs[1:]))


def test_streamed_scoring_equals_unstreamed(client: openai.OpenAI):
    whole = score(client).choices[0]
    chunks = list(score(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert text == whole.text and logprobs == whole.logprobs.token_logprobs
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 0


def test_a_batch_of_prompts_with_n_choices_is_scored_and_frees_its_blocks(client: openai.OpenAI, http):
    prompts = [SCORED, "Once upon a time"]
    reply = score(client, prompt=prompts, n=2)
    assert [c.text for c in reply.choices] == [SCORED, SCORED, prompts[1], prompts[1]]
    assert reply.choices[0].logprobs == reply.choices[1].logprobs
    assert reply.choices[2].logprobs.token_logprobs[1:] == score(client, prompt=prompts[1]).choices[0].logprobs.token_logprobs[1:]
    wait_until(lambda: kv_blocks_used(http) == 0)


def test_a_prompt_that_fills_the_context_can_be_scored_not_continued(client: openai.OpenAI):
    full = list(range(1000, 1256))  # the tiny model's whole context, 256 tokens
    assert len(score(client, prompt=full).choices[0].logprobs.tokens) == 256
    with pytest.raises(openai.BadRequestError):
        score(client, prompt=full, max_tokens=1)


@pytest.mark.parametrize("fields", [{"echo": False}, {"logprobs": None}], ids=["without echo", "without logprobs"])
def test_max_tokens_0_that_scores_nothing_is_400(http, fields: dict):
    body = {"prompt": "Hi", "max_tokens": 0, "echo": True, "logprobs": 1, **fields}
    response = http.post("/v1/completions", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_completions_carry_a_stable_system_fingerprint(client: openai.OpenAI):
    first, second = complete(client), complete(client, stream=True)
    fingerprints = {first.system_fingerprint} | {chunk.system_fingerprint for chunk in second}
    assert len(fingerprints) == 1 and first.system_fingerprint.startswith("fp_")
