"""POST /v1/completions: prompts as text or token ids, echo, legacy logprobs, streaming."""
from __future__ import annotations

import json

import openai

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
