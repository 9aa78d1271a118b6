"""Chat messages to a prompt: the default role-labelled template, its implicit stop, and
--chat-template overrides."""
from __future__ import annotations

import httpx
import openai
import pytest

from gptserve.server.chat_template import ChatTemplate, ChatTemplateError
from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol import ChatMessage

EOS = "<|endoftext|>"
NEWLINE, USER, COLON = 198, 12982, 25  # GPT-2's ids of "\n", "User", ":"


def messages(*turns: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in turns]


def test_default_template_labels_turns_and_ends_with_the_assistant_cue():
    template = ChatTemplate.load(None, EOS, EOS)
    text = template.render(messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")))
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"


def test_default_template_stops_at_the_next_user_cue():
    assert ChatTemplate.load(None, EOS, EOS).stop == ["\nUser:"]


def test_developer_role_is_a_system_turn():
    assert ChatTemplate.load(None, EOS, EOS).render(messages(("developer", "Rules."))) == "System: Rules.\nAssistant:"


def test_text_parts_are_joined_by_newlines():
    message = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert ChatTemplate.load(None, EOS, EOS).render([message]) == "User: a\nb\nAssistant:"


def test_template_file_replaces_the_default_and_its_stop(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    template = ChatTemplate.load(str(path), EOS, EOS)
    assert template.render(messages(("user", "Hi"))) == "<user>Hi<assistant>"
    assert template.stop == []


def test_template_text_may_be_given_inline():
    template = ChatTemplate.load("{{ messages[0].content | upper }}", EOS, EOS)
    assert template.render(messages(("user", "hi"))) == "HI"


def test_missing_template_file_is_a_start_up_error():
    with pytest.raises(ChatTemplateError, match="does not exist"):
        ChatTemplate.load("/no/such/template.jinja", EOS, EOS)


def test_template_that_does_not_compile_is_a_start_up_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.load("{% for m in messages %}", EOS, EOS)


def test_template_raising_an_exception_rejects_the_request():
    template = ChatTemplate.load("{{ raise_exception('only one message, please') }}", EOS, EOS)
    with pytest.raises(InvalidRequestError, match="only one message"):
        template.render(messages(("user", "Hi")))


def test_reply_ends_before_the_model_writes_the_users_turn(client: openai.OpenAI, http: httpx.Client):
    # only "\n", "User" and ":" may be sampled, so the model soon writes "\nUser:"
    chat_messages = [{"role": "user", "content": "Hi"}]
    settings = {"temperature": 2.0, "seed": 3, "max_tokens": 200,
                "logit_bias": {str(t): 100 for t in (NEWLINE, USER, COLON)}}
    reply = client.chat.completions.create(model="tiny-gpt2", messages=chat_messages, **settings)
    prompt = http.post("/tokenize", json={"messages": chat_messages}).json()["tokens"]
    unstopped = client.completions.create(model="tiny-gpt2", prompt=prompt, **settings).choices[0].text
    assert "\nUser:" in unstopped
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == unstopped[:unstopped.index("\nUser:")]


def test_server_uses_the_chat_template_file(launch, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{{ eos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    running = launch(chat_template=str(path))
    with running.http() as http:
        body = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert body["tokens"][0] == 50256  # the template's eos_token is the special token
    assert "".join(body["token_strs"]) == EOS + "Hi"


def test_endoftext_written_in_a_message_stays_text(http: httpx.Client):
    body = http.post("/tokenize", json={"messages": [{"role": "user", "content": EOS}]}).json()
    assert 50256 not in body["tokens"]
    assert EOS in "".join(body["token_strs"])
