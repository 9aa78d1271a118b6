"""The bundled default model, served at the default precision, used as a newcomer uses it:
answers that end their turn, JSON mode, forced tool calls, and the OpenAI Agents SDK's
function-tool run. Greedy decoding, so each answer is the same on every run."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from gptserve.weights.loader import DEFAULT_MODEL_DIR
from tests.server.conftest import MODEL_NAME, RunningServer, start_server

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def bundled() -> Iterator[RunningServer]:
    running = start_server(DEFAULT_MODEL_DIR, {"kv_cache_memory": 32 * 2**20})
    yield running
    running.stop()


def ask(server: RunningServer, content: str, max_tokens: int, **kwargs):
    return server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens,
        **kwargs).choices[0]


@pytest.mark.parametrize("question", ["Who made the heaven and the earth?", "Hello!", "What is 12 plus 30?",
                                      "Quote John 3:16."])
def test_answers_end_their_turn(bundled, question):
    choice = ask(bundled, question, 128)
    assert choice.finish_reason == "stop" and choice.message.content.strip(), choice


@pytest.mark.parametrize("prompt", [
    'Reply with a JSON object with the keys "name" and "age" for: Tom is 31 years old.',
    'Give "city" and "country" as JSON. Text: We spent a week in Lisbon, Portugal.',
    "Give a JSON object describing a cat.",
])
def test_json_mode_answers_are_closed_objects(bundled, prompt):
    choice = ask(bundled, prompt, 64, response_format={"type": "json_object"})
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_answer_validates(bundled):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    choice = ask(bundled, "Extract the person: Maria is 34 years old.", 64,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(choice.message.content)
    assert choice.finish_reason == "stop" and set(value) == {"name", "age"} and value["age"] == 34, value


def test_required_tool_call_closes_with_the_numbers_the_user_gave(bundled):
    choice = ask(bundled, "What is 12 plus 30?", 200, tools=[WEATHER, ADD], tool_choice="required")
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0].function
    assert call.name == "add" and json.loads(call.arguments) == {"a": 12, "b": 30}


def test_auto_answers_in_words_when_no_tool_fits(bundled):
    choice = ask(bundled, "Thank you!", 64, tools=[ADD], tool_choice="auto")
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content, choice


@pytest.mark.parametrize("api", ["responses", "chat_completions"])  # the SDK's default model first
def test_agents_sdk_function_tool_run_ends_with_an_answer(bundled, api):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    calls: list[tuple[int, int]] = []

    @agents.function_tool
    def add(a: int, b: int) -> str:
        """Add two integers."""
        calls.append((a, b))
        return json.dumps({"result": a + b})

    model = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
    client = AsyncOpenAI(base_url=f"{bundled.base_url}/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(name="calculator", instructions="You are a helpful agent. Use the tools you are given.",
                         tools=[add], model=model(model=MODEL_NAME, openai_client=client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=100))
    result = asyncio.run(agents.Runner.run(agent, "What is 25 + 17?", max_turns=4))
    assert calls == [(25, 17)]
    assert isinstance(result.final_output, str) and result.final_output.strip(), result.final_output
