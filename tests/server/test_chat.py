"""POST /v1/chat/completions through the official openai client and raw HTTP."""
from __future__ import annotations

import codecs
import json

import httpx
import openai

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
FIXED = {"ignore_eos": True}  # random weights: without it a reply may end at any token


def chat(client: openai.OpenAI, **kwargs):
    args = {"model": "tiny-gpt2", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "extra_body": FIXED}
    return client.chat.completions.create(**{**args, **kwargs})


def test_reply_is_a_chat_completion_with_usage(client: openai.OpenAI):
    reply = chat(client, max_tokens=7)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny-gpt2"
    [choice] = reply.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_temperature_zero_is_deterministic(client: openai.OpenAI):
    first, second = chat(client), chat(client)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_same_seed_gives_the_same_sample(client: openai.OpenAI):
    first, second = chat(client, temperature=1.0, seed=1234), chat(client, temperature=1.0, seed=1234)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_streamed_text_equals_unstreamed_text(client: openai.OpenAI):
    whole = chat(client).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(client, stream=True) if chunk.choices)
    assert streamed == whole


def test_stream_opens_with_role_closes_with_finish_reason_and_done(server):
    events = server.sse("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "stream": True, **FIXED})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_usage_chunk_comes_last_when_asked(client: openai.OpenAI):
    chunks = list(chat(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_option_has_no_usage_chunk(client: openai.OpenAI):
    chunks = list(chat(client, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    assert all(c.choices and c.usage is None for c in chunks)


def test_n_choices_are_indexed(client: openai.OpenAI):
    reply = chat(client, n=3, temperature=1.0, seed=7, max_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 15


def test_streamed_n_choices_each_get_role_content_and_finish(client: openai.OpenAI):
    texts, roles, finishes = {}, {}, {}
    for chunk in chat(client, n=3, temperature=1.0, seed=7, max_tokens=5, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles[choice.index] = roles.get(choice.index) or choice.delta.role
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    whole = chat(client, n=3, temperature=1.0, seed=7, max_tokens=5)
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_stop_string_cuts_the_reply(client: openai.OpenAI):
    full = chat(client, max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    reply = chat(client, max_tokens=20, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[:full.index(stop)]


def test_max_completion_tokens_limits_the_reply(client: openai.OpenAI):
    reply = chat(client, max_tokens=None, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_logprobs_come_in_chat_format(client: openai.OpenAI):
    reply = chat(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0
        assert bytes(token.bytes).decode() == token.token
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the likeliest


def test_streamed_logprobs_cover_every_token(client: openai.OpenAI):
    tokens = [t for chunk in chat(client, max_tokens=5, logprobs=True, stream=True)
              if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert len(tokens) == 5


def test_content_may_be_a_list_of_text_parts(client: openai.OpenAI):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    assert chat(client, messages=parts).choices[0].message.content == chat(client).choices[0].message.content


def test_unknown_extra_fields_are_ignored(client: openai.OpenAI):
    reply = chat(client, extra_body={**FIXED, "some_future_option": {"x": 1}}, store=False, metadata={"a": "b"})
    assert reply.choices[0].finish_reason == "length"


def test_model_may_be_omitted(http: httpx.Client):
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["model"] == "tiny-gpt2"


async def test_async_client_streams(server):
    client = server.async_client()
    stream = await client.chat.completions.create(model="tiny-gpt2", messages=MESSAGES, max_tokens=4,
                                                  temperature=0, stream=True, extra_body=FIXED)
    finishes = [chunk.choices[0].finish_reason async for chunk in stream if chunk.choices]
    assert finishes[-1] == "length"
    await client.close()


# --- the faithful stream: a token's text goes out with that token ---------------------------

STORY = [{"role": "user", "content": "Tell me a story."}]
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 40, "extra_body": FIXED}  # varied tokens, reproducible


def replay(token_bytes: list[bytes], stops: list[str]) -> tuple[list[str], list[bool]]:
    """What each token should release when streamed: its text, less the tail of everything
    so far that is a proper prefix of a stop string (held until the next token decides) and
    less an unfinished UTF-8 character; the last token also releases what is still held.
    And whether anything was held after each token."""
    decoder, pending, released, holding = codecs.getincrementaldecoder("utf-8")("replace"), "", [], []
    for data in token_bytes:
        pending += decoder.decode(data)
        held = max((k for k in range(1, len(pending) + 1)
                    if any(len(s) > k and s.startswith(pending[-k:]) for s in stops)), default=0)
        released.append(pending[:len(pending) - held])
        pending = pending[len(pending) - held:]
        holding.append(bool(pending) or decoder.getstate()[0] != b"")
    released[-1] += pending + decoder.decode(b"", final=True)
    holding[-1] = False
    return released, holding


def test_each_token_streams_its_own_text_unless_a_stop_string_may_begin(client: openai.OpenAI):
    tokens = chat(client, messages=STORY, logprobs=True, **SAMPLED).choices[0].logprobs.content
    # a stop string that never occurs but begins like a token that does: that token's text is
    # held until the next token shows it is not the stop string
    held_token = next(t for t in tokens[5:-1] if t.token.strip() and bytes(t.bytes).decode("utf-8", "replace") == t.token)
    stops = [held_token.token + "\u2042never", "\nUser:"]  # the second: the default template's own
    chunks = [c.choices[0] for c in chat(client, messages=STORY, logprobs=True, stop=stops[0], stream=True, **SAMPLED)
              if c.choices and c.choices[0].logprobs]
    assert [t.token for c in chunks for t in c.logprobs.content] == [t.token for t in tokens]
    assert [len(c.logprobs.content) for c in chunks] == [1] * 40  # one chunk a token
    expected, holding = replay([bytes(t.bytes) for t in tokens], stops)
    assert [c.delta.content or "" for c in chunks] == expected
    assert expected.count("") >= 1  # the stop string's beginning was really held
    for chunk, held_before, held_after in zip(chunks, [False] + holding, holding):
        if not held_before and not held_after:  # the chunk's text is its own token's, whole
            assert bytes(chunk.logprobs.content[0].bytes).decode() == chunk.delta.content


def test_every_token_is_a_content_chunk_unless_its_text_is_held(client: openai.OpenAI):
    tokens = chat(client, messages=STORY, logprobs=True, **SAMPLED).choices[0].logprobs.content
    expected, _ = replay([bytes(t.bytes) for t in tokens], ["\nUser:"])
    contents = [c.choices[0].delta.content for c in chat(client, messages=STORY, stream=True, **SAMPLED)
                if c.choices and c.choices[0].delta.content]
    assert contents == [text for text in expected if text]
    assert len(contents) == 40 - expected.count("")


def test_chat_answers_and_chunks_carry_the_servers_system_fingerprint(client: openai.OpenAI, server):
    fingerprint = server.serving.system_fingerprint
    assert fingerprint.startswith("fp_") and len(fingerprint) > 3
    assert chat(client).system_fingerprint == fingerprint
    assert {chunk.system_fingerprint for chunk in chat(client, stream=True)} == {fingerprint}
