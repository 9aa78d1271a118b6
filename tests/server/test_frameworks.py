"""Frameworks people use with OpenAI-compatible servers, unmodified, against the real
server: LangChain's structured output and tools, and the OpenAI Agents SDK with a
function tool and a typed output. The tiny random model has no judgement, so the tools
are forced (tool_choice) and every field is bounded so answers end within max_tokens."""
from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")
agents = pytest.importorskip("agents")


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=10)
    age: int = Field(ge=0, le=120)


City = Literal["Paris", "Rome", "Jerusalem"]  # bounded arguments: a random model's calls end


def get_weather(city: City) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def chat_model(server, **kwargs):
    return langchain_openai.ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", model="tiny-gpt2",
                                       max_retries=0, max_tokens=80, **kwargs)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_model(server, method: str):
    structured = chat_model(server).with_structured_output(Person, method=method)
    person = structured.invoke("Describe a person.")
    assert isinstance(person, Person)


def test_langchain_bind_tools_gives_tool_calls_with_arguments(server):
    model = chat_model(server).bind_tools([get_weather], tool_choice="get_weather")
    message = model.invoke("What is the weather in Paris?")
    assert message.tool_calls, (message.content, message.response_metadata)
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Jerusalem")
    assert call["id"].startswith("call_")


@pytest.fixture
def agents_client(server):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def weather_agent(model, **settings) -> tuple["agents.Agent", list[str]]:
    """An agent that must call its one tool and stops with the tool's answer; the cities it was asked for."""
    calls: list[str] = []

    @agents.function_tool
    def lookup_weather(city: City) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = agents.Agent(
        name="weather", instructions="Answer with the weather.", tools=[lookup_weather], model=model,
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60, **settings),
        tool_use_behavior="stop_on_first_tool")
    return agent, calls


def test_agents_sdk_runs_a_function_tool(agents_client):
    agent, calls = weather_agent(agents.OpenAIChatCompletionsModel(model="tiny-gpt2", openai_client=agents_client))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Rome?"))
    assert calls and result.final_output == f"sunny in {calls[0]}"


def test_agents_sdk_returns_a_typed_output(agents_client):
    agent = agents.Agent(
        name="describer", instructions="Describe a person.", output_type=Person,
        model=agents.OpenAIChatCompletionsModel(model="tiny-gpt2", openai_client=agents_client),
        model_settings=agents.ModelSettings(max_tokens=80))
    result = asyncio.run(agents.Runner.run(agent, "Who is Ada?"))
    assert isinstance(result.final_output, Person)


def test_langchain_embeddings_embed_documents_and_queries(server):
    # check_embedding_ctx_length=False: LangChain's setting for servers other than OpenAI's
    # (otherwise it sends OpenAI's own token ids)
    embeddings = langchain_openai.OpenAIEmbeddings(base_url=f"{server.base_url}/v1", api_key="unused",
                                                   model="tiny-gpt2", check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(["light", "darkness"])
    query = embeddings.embed_query("light")
    assert len(documents) == 2 and len(query) == 64
    assert max(abs(a - b) for a, b in zip(documents[0], query)) < 1e-5


# --- the Responses API, as these frameworks call it by default or when asked ---


def test_agents_sdk_default_responses_model_runs_a_function_tool(agents_client):
    agent, calls = weather_agent(agents.OpenAIResponsesModel(model="tiny-gpt2", openai_client=agents_client),
                                 parallel_tool_calls=False)
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Rome?"))
    assert calls and result.final_output == f"sunny in {calls[0]}"


def test_agents_sdk_responses_model_continues_by_previous_response_id(agents_client):
    # a typed output (text.format) ends within max_tokens; free text from a random model
    # would be cut, which the SDK treats as an error, as it would with OpenAI's
    agent = agents.Agent(name="describer", instructions="Describe a person.", output_type=Person,
                         model=agents.OpenAIResponsesModel(model="tiny-gpt2", openai_client=agents_client),
                         model_settings=agents.ModelSettings(max_tokens=80))

    async def two_turns():
        first = await agents.Runner.run(agent, "Who is Ada?")
        return first, await agents.Runner.run(agent, "And Bob?", previous_response_id=first.last_response_id)

    first, second = asyncio.run(two_turns())
    assert first.last_response_id and first.last_response_id.startswith("resp_")
    assert isinstance(second.final_output, Person) and second.last_response_id != first.last_response_id


def test_langchain_with_use_responses_api_calls_tools(server):
    model = chat_model(server, use_responses_api=True).bind_tools([get_weather], tool_choice="get_weather")
    message = model.invoke("What is the weather in Paris?")
    assert message.tool_calls, (message.content, message.response_metadata)
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"]["city"] in ("Paris", "Rome", "Jerusalem")
    assert message.response_metadata.get("id", "").startswith("resp_")


def test_pydantic_ai_responses_model_returns_a_typed_output(server):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel("tiny-gpt2", provider=OpenAIProvider(base_url=f"{server.base_url}/v1",
                                                                      api_key="unused"))
    agent = pydantic_ai.Agent(model, output_type=Person, model_settings={"max_tokens": 80})
    result = agent.run_sync("Describe a person.")
    assert isinstance(result.output, Person)
