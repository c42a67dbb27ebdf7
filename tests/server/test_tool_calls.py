"""Tool calling on /v1/chat/completions through the real `openai` client. What reaches the chat template,
refusals, and answers parsed into calls are checked in-process over the fake engine; calls forced by a
grammar, and agents that use them, against a live server on the real engine."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from engine.async_engine import AsyncEngine
from server.app import create_app
from server.openai.chat_template import apply_chat_template
from server.openai.schemas import ChatCompletionRequest
from server.openai.tools import parser_for, plan_tools
from server.state import ServerState
from tests.factories import build_tokenizer
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config, fake_engine

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                      "parameters": TIME_PARAMETERS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(tiny_model_factory, tiny_adapter_factory):
    """A tiny model with a context long enough for the tools' system prompt (the tiny tokenizer is wordy)."""
    model_dir = tiny_model_factory("llama", max_position_embeddings=2048)
    adapters = {name: tiny_adapter_factory(model_dir, seed=300 + i, weight_scale=1.5)
                for i, name in enumerate(ADAPTER_NAMES[:2])}
    engine = AsyncEngine(engine_config(model_dir, max_model_len=2048), adapters=adapters,
                         served_model_name=MODEL_NAME)
    server = LiveServer(create_app(ServerState(engine))).start()
    yield server
    server.stop()


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


def _check_calls(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER_NAMES[1]])
def test_required_gives_valid_calls_and_finish_reason_tool_calls(client, model):
    for seed in range(3):
        response = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                                  tool_choice="required", max_tokens=1000, temperature=1.0,
                                                  seed=seed)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.content is None
        _check_calls(choice.message.tool_calls, set(SCHEMAS))
        assert response.model == model


def test_named_choice_calls_that_function_once(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model=ADAPTER_NAMES[0], messages=MESSAGES, tools=TOOLS, max_tokens=300, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, {"get_time"})


def test_parallel_tool_calls_false_gives_exactly_one_call(client):
    for seed in range(4):
        response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  max_tokens=300, temperature=1.0, seed=seed)
        assert len(response.choices[0].message.tool_calls) == 1
        _check_calls(response.choices[0].message.tool_calls, set(SCHEMAS))


def test_streamed_calls_reassemble_with_the_clients_helper(client):
    kwargs = dict(model=ADAPTER_NAMES[1], messages=MESSAGES, max_tokens=300, temperature=0.0,
                  parallel_tool_calls=False)
    with client.chat.completions.stream(tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required",
                                        **kwargs) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    # The same request unstreamed (greedy) makes the same call.
    unstreamed = client.chat.completions.create(tools=[openai.pydantic_function_tool(GetWeather)],
                                                tool_choice="required", **kwargs).choices[0].message.tool_calls
    assert json.loads(unstreamed[0].function.arguments) == json.loads(call.function.arguments)


def test_stream_chunks_name_each_call_first_then_stream_its_arguments(client):
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, stream=True,
                                                 tool_choice="required", max_tokens=1000, seed=3))
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert not any(ch.delta.content for c in chunks for ch in c.choices)
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        if delta.index not in calls:
            assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
            calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
        else:
            assert delta.id is None and delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments
    assert calls and len(deltas) > 2 * len(calls)  # arguments come in pieces
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("parser", ["llama3_json", "mistral"])
def test_forced_calls_follow_the_configured_parser(live, client, monkeypatch, parser):
    monkeypatch.setattr(live.state, "tool_call_parser", parser)
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=300,
                                              tool_choice="required", parallel_tool_calls=False, seed=1)
    assert response.choices[0].finish_reason == "tool_calls"
    _check_calls(response.choices[0].message.tool_calls, set(SCHEMAS))


def _bad_request(client, **kwargs):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=5, **{"messages": MESSAGES, **kwargs})
    return caught.value


@pytest.fixture
def fake_tools(fake_app):
    """In-process over the fake engine, with room for the tools' system prompt (the tiny tokenizer is wordy)."""
    return fake_app(fake_engine(max_model_len=2048))


def test_bad_tool_requests_are_400s_naming_the_problem(fake_tools):
    client = fake_tools.client()
    error = _bad_request(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_mood"}})
    assert error.status_code == 400 and "get_mood" in error.message and error.body["param"] == "tool_choice"
    error = _bad_request(client, tool_choice="required")
    assert "tools" in error.message and error.body["param"] == "tool_choice"
    broken = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]
    error = _bad_request(client, tools=broken)
    assert "not a valid JSON schema" in error.message and error.body["param"] == "tools"
    error = _bad_request(client, tools=TOOLS + TOOLS[:1])
    assert "get_weather" in error.message
    error = _bad_request(client, tools=TOOLS, tool_choice="sometimes")
    assert error.body["param"] == "tool_choice"
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]
    error = _bad_request(client, messages=history)
    assert "messages[1].tool_calls[0].function.arguments" in error.message


def _prompts(app) -> list[str]:
    """The prompts the engine was asked to continue, as text."""
    return [app.engine.tokenizer.decode(request.prompt_token_ids) for request in app.engine.requests]


def test_tool_calls_and_results_in_the_conversation_reach_the_template(fake_tools):
    client = fake_tools.client()
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_7", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_7", "content": '{"forecast": "sunny"}'}]
    client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=3)
    (prompt,) = _prompts(fake_tools)
    # The tiny model's ChatML template takes no tools: they come in the fallback system prompt, the
    # earlier call in the Hermes format and its result as a tool response.
    assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call><|im_end|>') in prompt
    assert '<|im_start|>user\n<tool_response>\n{"forecast": "sunny"}\n</tool_response><|im_end|>' in prompt


def test_none_offers_no_tools_and_never_yields_calls(fake_tools):
    fake_tools.engine.answers[None] = HERMES_CALL  # even an answer that looks like a call stays text
    response = fake_tools.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                                                           tool_choice="none", max_tokens=200, seed=0)
    (prompt,) = _prompts(fake_tools)
    assert "get_weather" not in prompt and "<tool_call>" not in prompt
    assert response.choices[0].message.tool_calls is None and response.choices[0].message.content == HERMES_CALL
    assert response.choices[0].finish_reason == "stop"


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def test_an_answer_in_the_models_call_format_becomes_tool_calls_whole_and_streamed(fake_tools):
    fake_tools.engine.answers[None] = f"Let me look.\n{HERMES_CALL}"
    client = fake_tools.client()
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content.strip() == "Let me look."
    (call,) = whole.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.content is None  # with tools offered, the opening has no content
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris", "unit": "celsius"}
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices).strip() == "Let me look."
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]


NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ ' | ' }}{% endif %}"
    "{% for m in messages %}{{ m.role }}:"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} city={{ c.function.arguments.city }}"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{% if m.role == 'tool' %} name={{ m.name }} id={{ m.tool_call_id }}{% endif %}{{ ' | ' }}{% endfor %}"
)


def test_a_template_that_takes_tools_gets_them_and_calls_with_dict_arguments():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = NATIVE_TEMPLATE
    req = ChatCompletionRequest.model_validate({"messages": [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "snow"}], "tools": TOOLS})
    plan = plan_tools(req, parser_for(None, NATIVE_TEMPLATE))
    prompt = tokenizer.decode(apply_chat_template(tokenizer, req.messages, tools=plan))
    assert prompt.startswith("TOOLS:get_weather;get_time; | user:")
    assert " | assistant:CALL get_weather city=Oslo | " in prompt  # arguments reach the template as a dict
    assert " | tool:snow name=get_weather id=call_9 | " in prompt  # the name is found from the call's id
    assert "# Tools" not in prompt


def test_the_openai_agents_sdk_runs_a_one_tool_agent(live):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return json.dumps({"city": city, "forecast": "sunny"})

    client = AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0)
    model = OpenAIChatCompletionsModel(model=ADAPTER_NAMES[0], openai_client=client)
    # "required" makes the first turn a call; the SDK resets it to auto once the tool ran.
    agent = Agent(name="weather", model=model, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120, temperature=0.0))
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4))
    assert len(cities) == 1
    assert isinstance(result.final_output, str) and result.final_output
    tool_outputs = [item for item in result.new_items if item.type == "tool_call_output_item"]
    assert tool_outputs and json.loads(tool_outputs[0].output)["forecast"] == "sunny"


@pytest.fixture(scope="module")
def demo_live():
    """The demo bundle `quiver serve` serves by default, with its tool-calling adapter."""
    from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle

    bundle = ensure_demo_bundle()
    engine = AsyncEngine(engine_config(bundle.model_dir, max_model_len=1024), adapters=bundle.adapters,
                         served_model_name=DEMO_MODEL_NAME)
    server = LiveServer(create_app(ServerState(engine))).start()
    yield server
    server.stop()


def test_demo_tools_adapter_calls_its_tool_on_auto_and_answers_otherwise(demo_live):
    from engine.demo import DEMO_TOOL

    client = demo_live.client()
    weather = client.chat.completions.create(model="demo-tools", messages=MESSAGES, tools=[DEMO_TOOL],
                                             temperature=0.0, max_tokens=60)
    choice = weather.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    other = client.chat.completions.create(model="demo-tools", messages=[{"role": "user", "content": "What is a quiver?"}],
                                           tools=[DEMO_TOOL], temperature=0.0, max_tokens=60).choices[0]
    assert other.message.tool_calls is None and "quiver" in other.message.content.lower()
    refused = client.chat.completions.create(model="demo-tools", messages=MESSAGES, tools=[DEMO_TOOL],
                                             tool_choice="none", temperature=0.0, max_tokens=60).choices[0]
    assert refused.message.tool_calls is None and refused.finish_reason != "tool_calls"


def test_demo_tool_prompt_is_the_servers_fallback_prompt():
    from engine.demo import DEMO_TOOL, tool_call_text, tool_system_prompt
    from server.openai.tool_parsers import parser_named

    hermes = parser_named("hermes")
    request_tool = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": [DEMO_TOOL]}).tools[0]
    assert tool_system_prompt([DEMO_TOOL]) == hermes.instructions([request_tool.model_dump(exclude_none=True)])
    assert tool_call_text("get_weather", {"city": "Paris"}) == hermes.render_calls([("get_weather", {"city": "Paris"})])
