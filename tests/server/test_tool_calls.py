"""Tool calling on /v1/chat/completions through the real `openai` client against a live server."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from engine.async_engine import AsyncEngine
from server.app import create_app
from server.state import ServerState
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config

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

    city: str
    unit: str


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
