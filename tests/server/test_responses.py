"""POST /v1/responses (and retrieve, delete, input items) through the real `openai` client: answers equal
the chat path's for the same conversation, streamed events come in the order the SDK's accumulator
expects, stored responses continue conversations (also after a restart), and what is not supported is a
400 naming it. Refusals, budgets and stored items are checked in-process over the fake engine (its store
a file per test); answers, formats and tools against a live server on the real engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from openai.types.responses import Response
from pydantic import BaseModel

from server.app import create_app
from server.limits import Limits
from server.openai.responses import responses_routes
from server.openai.responses_output import ResponseBuilder, ResponseDraft
from server.state import ServerState
from server.store import Store
from tests.eventually import eventually
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, InProcessApp, LiveServer, engine_config

PROMPT = "Hello world! Tell me about the quick brown fox."


@pytest.fixture(scope="module")
def start_responses_server(server_model_dir: Path, server_adapters: dict[str, Path]
                           ) -> Iterator[Callable[..., LiveServer]]:
    """A server with the Responses routes over a store at `db`; stopped (and its store closed) at the end."""
    from engine.async_engine import AsyncEngine

    started: list[LiveServer] = []

    def start(db: Path, limits: Limits | None = None, model_dir: Path | None = None, **config: Any) -> LiveServer:
        engine = AsyncEngine(engine_config(model_dir or server_model_dir, **config),
                             adapters={} if model_dir else server_adapters, served_model_name=MODEL_NAME)
        state = ServerState(engine)
        store = Store(db)
        live = LiveServer(create_app(state, extra_routes=responses_routes(store), limits=limits)).start()
        started.append((live, store))
        return live

    yield start
    for live, store in started:
        if live._thread.is_alive():
            live.stop()
        store.close()


@pytest.fixture(scope="module")
def live(start_responses_server: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    return start_responses_server(tmp_path_factory.mktemp("responses") / "state.sqlite3")


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return live.client()


@pytest.fixture
def fake_responses(fake_app: Callable[..., InProcessApp], tmp_path: Path) -> Iterator[InProcessApp]:
    """The Responses routes over a store, in-process over the fake engine."""
    store = Store(tmp_path / "state.sqlite3")
    yield fake_app(routes=lambda state: responses_routes(store))
    store.close()


@pytest.fixture
def fake_client(fake_responses: InProcessApp) -> openai.OpenAI:
    return fake_responses.client()


def _create(client: openai.OpenAI, **kwargs: Any) -> Response:
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("max_output_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.responses.create(**kwargs)


def _chat_text(client: openai.OpenAI, messages: list[dict[str, Any]], model: str = MODEL_NAME,
               max_tokens: int = 8, **kwargs: Any) -> tuple[str, Any]:
    choice_response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                     temperature=0, **kwargs)
    return choice_response.choices[0].message.content or "", choice_response


# ---- text ----------------------------------------------------------------------------------


def test_text_response_shape_and_equal_to_chat(client: openai.OpenAI) -> None:
    response = _create(client, input=PROMPT)
    assert isinstance(response, Response)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == MODEL_NAME and response.created_at > 0
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"] and item.content[0].annotations == []
    text, chat = _chat_text(client, [{"role": "user", "content": PROMPT}])
    assert response.output_text == text == item.content[0].text
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens and usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.store is True and response.previous_response_id is None
    assert response.text.format.type == "text" and response.tools == [] and response.tool_choice == "auto"


@pytest.mark.parametrize("model", [ADAPTER_NAMES[0], ADAPTER_NAMES[3]])
def test_adapters_and_item_lists_render_as_chat(client: openai.OpenAI, model: str) -> None:
    items = [{"role": "developer", "content": "Answer in French."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                             {"type": "input_text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Bonjour."}]},
             {"role": "user", "content": "And the fox?"}]
    response = _create(client, model=model, input=items, instructions="You are terse.")
    assert response.model == model and response.instructions == "You are terse."
    text, _ = _chat_text(client, [{"role": "system", "content": "You are terse."},
                                  {"role": "developer", "content": "Answer in French."},
                                  {"role": "user", "content": "Hello there"},
                                  {"role": "assistant", "content": "Bonjour."},
                                  {"role": "user", "content": "And the fox?"}], model=model)
    assert response.output_text == text
    base = _create(client, input=items, instructions="You are terse.", max_output_tokens=16)
    adapted = _create(client, model=model, input=items, instructions="You are terse.", max_output_tokens=16)
    assert base.output_text != adapted.output_text


def test_max_output_tokens_cuts_to_incomplete(fake_client: openai.OpenAI) -> None:
    response = _create(fake_client, input=PROMPT, max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 2 and response.output[0].status == "incomplete"


def test_metadata_and_user_are_echoed(fake_client: openai.OpenAI) -> None:
    response = _create(fake_client, input=PROMPT, metadata={"team": "archery"}, user="u-1", max_output_tokens=1)
    assert response.metadata == {"team": "archery"} and response.user == "u-1"
    assert fake_client.responses.retrieve(response.id).metadata == {"team": "archery"}


# ---- structured outputs --------------------------------------------------------------------

FLAG_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
               "required": ["ok", "n"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_format_validates(client: openai.OpenAI, stream: bool) -> None:
    fmt = {"type": "json_schema", "name": "flag", "schema": FLAG_SCHEMA, "strict": True}
    if stream:
        with client.responses.stream(model=MODEL_NAME, input=PROMPT, text={"format": fmt}, max_output_tokens=40,
                                     temperature=1.0) as events:
            response = events.get_final_response()
    else:
        response = _create(client, input=PROMPT, text={"format": fmt}, max_output_tokens=40, temperature=1.0)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), FLAG_SCHEMA)
    assert response.text.format.type == "json_schema" and response.text.format.name == "flag"


def test_json_object_format_is_chats_json_object(client: openai.OpenAI) -> None:
    response = _create(client, input=PROMPT, text={"format": {"type": "json_object"}}, max_output_tokens=24)
    text, _ = _chat_text(client, [{"role": "user", "content": PROMPT}], max_tokens=24,
                         response_format={"type": "json_object"})
    assert response.output_text == text and text.startswith("{")
    assert response.text.format.type == "json_object"
    assert _create(client, input=PROMPT, max_output_tokens=24).output_text != text


def test_bad_schema_names_text_format(fake_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        _create(fake_client, input=PROMPT, text={"format": {"type": "json_schema", "name": "bad",
                                                       "schema": {"type": "strin"}}})
    assert error.value.body["param"] == "text.format"


# ---- streaming -----------------------------------------------------------------------------

MESSAGE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added"]
MESSAGE_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER_NAMES[1]])
def test_stream_events_in_order_and_equal_to_unstreamed(client: openai.OpenAI, model: str) -> None:
    full = _create(client, model=model, input=PROMPT, max_output_tokens=12)
    with client.responses.stream(model=model, input=PROMPT, max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    types = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    terminal = "response.incomplete" if full.status == "incomplete" else "response.completed"
    assert types == MESSAGE_EVENTS + ["response.output_text.delta"] * len(deltas) + MESSAGE_END + [terminal]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in deltas) == full.output_text
    assert events[-1].response.output_text == full.output_text
    assert events[-1].response.usage.output_tokens == full.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == events[-1].response.id
    if terminal == "response.completed":  # the helper's final response comes only with response.completed
        final = stream.get_final_response()
        assert final.output_text == full.output_text and final.status == "completed"
    # stored as streamed
    assert client.responses.retrieve(events[-1].response.id).output_text == full.output_text


def test_create_stream_true_iterates_typed_events(client: openai.OpenAI) -> None:
    events = list(_create(client, input=PROMPT, stream=True, max_output_tokens=3))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    item = next(event.item for event in events if event.type == "response.output_item.done")
    assert item.status == "incomplete" and item.content[0].text == events[-1].response.output_text


def _idle_stats(live: LiveServer, timeout: float) -> dict[str, Any]:
    def idle() -> dict[str, Any] | None:
        stats = live.engine.stats()
        return stats if stats["num_requests"] == 0 and stats["num_streams"] == 0 else None

    return eventually(idle, timeout, "the engine holds no request")


def test_closing_a_stream_aborts_its_request_and_leaks_nothing(live: LiveServer) -> None:
    # 230 tokens take about a second on this model; an abort ends the request at once
    body = {"model": ADAPTER_NAMES[2], "input": "Hi", "stream": True, "max_output_tokens": 230, "temperature": 0}
    with live.http() as http, http.stream("POST", "/v1/responses", json=body) as answer:
        assert answer.status_code == 200
        deltas = 0
        for line in answer.iter_lines():
            deltas += line.startswith("data:") and "response.output_text.delta" in line
            if deltas == 2:
                break
        assert live.engine.stats()["num_requests"] == 1
        closed_at = time.monotonic()
    stats = _idle_stats(live, timeout=0.5)
    assert time.monotonic() - closed_at < 0.5
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["adapter_refcount_total"] == 0


# ---- stored responses ----------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = _create(client, input=PROMPT, instructions="Be brief.")
    second = _create(client, input="Say more.", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    text, chat = _chat_text(client, [{"role": "user", "content": PROMPT},
                                     {"role": "assistant", "content": first.output_text},
                                     {"role": "user", "content": "Say more."}])
    assert second.output_text == text  # instructions are not carried over, as OpenAI does
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    third = _create(client, input="Once more.", previous_response_id=second.id, max_output_tokens=4)
    text, _ = _chat_text(client, [{"role": "user", "content": PROMPT},
                                  {"role": "assistant", "content": first.output_text},
                                  {"role": "user", "content": "Say more."},
                                  {"role": "assistant", "content": second.output_text},
                                  {"role": "user", "content": "Once more."}], max_tokens=4)
    assert third.output_text == text


def test_retrieve_input_items_and_delete(fake_client: openai.OpenAI) -> None:
    response = _create(fake_client, input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    assert fake_client.responses.retrieve(response.id).model_dump() == response.model_dump()
    items = fake_client.responses.input_items.list(response.id, order="asc")
    assert [item.content[0].text for item in items.data] == ["one", "two"]
    assert all(item.id.startswith("msg_") and item.type == "message" for item in items.data)
    newest = fake_client.responses.input_items.list(response.id, limit=1)
    assert [item.content[0].text for item in newest.data] == ["two"] and newest.has_more
    fake_client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        fake_client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as error:
        _create(fake_client, input="again", previous_response_id=response.id)
    assert error.value.body["param"] == "previous_response_id"


def test_store_false_is_not_kept(fake_client: openai.OpenAI) -> None:
    response = _create(fake_client, input=PROMPT, store=False, max_output_tokens=1)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        fake_client.responses.retrieve(response.id)


@pytest.mark.parametrize("call", ["retrieve", "delete", "input_items"])
def test_unknown_id_is_404_in_the_envelope(fake_responses: InProcessApp, call: str) -> None:
    path = "/v1/responses/resp_missing" + ("/input_items" if call == "input_items" else "")
    with fake_responses.http() as http:
        answer = http.delete(path) if call == "delete" else http.get(path)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "resp_missing" in error["message"]


def test_stored_responses_survive_a_restart(start_responses_server: Callable[..., LiveServer],
                                            tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    first_server = start_responses_server(db)
    first = _create(first_server.client(), input=PROMPT)
    first_server.stop()
    again = start_responses_server(db)
    client = again.client()
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = _create(client, input="Say more.", previous_response_id=first.id)
    text, _ = _chat_text(client, [{"role": "user", "content": PROMPT},
                                  {"role": "assistant", "content": first.output_text},
                                  {"role": "user", "content": "Say more."}])
    assert second.output_text == text


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"moderation": {"mode": "block"}}, "moderation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "file_search"}]}, "tools[1].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
])
def test_unsupported_or_invalid_fields_are_400s_naming_them(fake_responses: InProcessApp, fields: dict[str, Any],
                                                            param: str) -> None:
    body = {"model": MODEL_NAME, "input": PROMPT, "max_output_tokens": 4, **fields}
    with fake_responses.http() as http:
        answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_unknown_model_is_404(fake_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        _create(fake_client, model="no-such-adapter", input=PROMPT)
    assert error.value.body["code"] == "model_not_found"


def test_max_output_tokens_over_the_ceiling_is_refused(fake_app: Callable[..., InProcessApp], tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    capped = fake_app(routes=lambda state: responses_routes(store), limits=Limits(max_tokens=4))
    with pytest.raises(openai.BadRequestError) as error:
        _create(capped.client(), input=PROMPT, max_output_tokens=5)
    assert error.value.body["param"] == "max_output_tokens"
    assert _create(capped.client(), input=PROMPT, max_output_tokens=4).usage.output_tokens <= 4
    assert capped.engine.requests[-1].params.max_tokens == 4
    store.close()


# ---- the builder's failure events ----------------------------------------------------------


def _builder() -> ResponseBuilder:
    return ResponseBuilder(ResponseDraft(
        id="resp_x", created_at=1, model="m", instructions=None, tools=[], tool_choice=None,
        parallel_tool_calls=True, text={"format": {"type": "text"}}, temperature=1.0, top_p=1.0,
        max_output_tokens=None, previous_response_id=None, metadata={}, store=True, user=None))


def test_text_then_parallel_calls_become_items_in_order() -> None:
    """Chat chunks with text, then two calls whose arguments interleave: the message closes before the first
    call opens, each call's arguments go to its own item, and the calls close at the end."""
    builder = _builder()
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "Let me check."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}},
                                                                 {"index": 0, "function": {"arguments": " 1}"}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}]
    events = builder.started() + [event for chunk in chunks for event in builder.take_chunk(chunk)]
    events += builder.finished()
    assert [(e["type"], e.get("output_index")) for e in events[2:]] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0), ("response.output_text.delta", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1), ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1), ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2), ("response.completed", None)]
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Let me check." and final.usage.total_tokens == 14
    assert [(item.call_id, item.name, item.arguments) for item in final.output[1:]] == [
        ("call_a", "f", '{"x": 1}'), ("call_b", "g", "{}")]
    assert events[8]["item"]["arguments"] == "" and events[8]["item"]["status"] == "in_progress"


def test_an_error_after_the_start_fails_the_response() -> None:
    builder = _builder()
    events = builder.started() + builder.take_chunk({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    events += builder.failed({"message": "The engine failed.", "type": "server_error", "code": "engine_error"})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output[0].content[0].text == "Hi" and failed.output[0].status == "incomplete"
    assert events[-2]["message"] == "The engine failed."


# ---- function tools ------------------------------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
CHAT_WEATHER = {"type": "function", "function": {key: WEATHER[key] for key in ("name", "description", "parameters",
                                                                                "strict")}}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def tool_client(start_responses_server: Callable[..., LiveServer], tiny_model_factory: Callable[..., Path],
                tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    """A context long enough for the tools' system prompt (the tiny tokenizer is wordy)."""
    model_dir = tiny_model_factory("llama", max_position_embeddings=2048)
    db = tmp_path_factory.mktemp("tool-responses") / "state.sqlite3"
    return start_responses_server(db, model_dir=model_dir, max_model_len=2048).client()


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_function_call_round_trip(tool_client: openai.OpenAI, tool_choice: Any) -> None:
    client = tool_client
    first = _create(client, input=QUESTION, tools=[WEATHER], tool_choice=tool_choice, max_output_tokens=400)
    assert first.status == "completed", first
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    chat_choice = {"type": "function", "function": {"name": "get_weather"}} if isinstance(tool_choice, dict) \
        else tool_choice
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": QUESTION}],
                                          tools=[CHAT_WEATHER], tool_choice=chat_choice, max_tokens=400, temperature=0)
    assert chat.choices[0].message.tool_calls[0].function.arguments == call.arguments

    result = json.dumps({"city": "Paris", "sky": "clear"})
    second = _create(client, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=8,
                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}])
    text, reference = _chat_text(client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "name": call.name, "content": result}], tools=[CHAT_WEATHER])
    assert second.output_text == text
    assert second.usage.input_tokens == reference.usage.prompt_tokens > first.usage.input_tokens
    items = client.responses.input_items.list(second.id)
    assert [(item.type, item.call_id) for item in items.data] == [("function_call_output", call.call_id)]


def test_streamed_function_call_events(tool_client: openai.OpenAI) -> None:
    client = tool_client
    full = _create(client, input=QUESTION, tools=[WEATHER], tool_choice="required", max_output_tokens=400)
    with client.responses.stream(model=MODEL_NAME, input=QUESTION, tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=400, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.function_call_arguments.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[2].item.type == "function_call" and events[2].item.name == "get_weather"
    [call] = full.output
    assert "".join(event.delta for event in deltas) == call.arguments == final.output[0].arguments
    assert final.output[0].call_id == events[2].item.call_id


def test_an_openai_agents_sdk_agent_runs_a_tool_end_to_end(tool_client: openai.OpenAI) -> None:
    """The Agents SDK's default model speaks the Responses API. One agent makes a forced call and its tool runs;
    a second one takes that run's items (the call and its output) and answers in its output type (a json_schema
    format: the grammar ends it, where a random tiny model's free text would run into max_output_tokens)."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: a random model's string could run on
        """The weather in a city."""
        cities.append(city)
        return f"Clear skies in {city}."

    class Forecast(BaseModel):
        sunny: bool

    async_client = openai.AsyncOpenAI(base_url=str(tool_client.base_url), api_key="x", max_retries=0)
    model = agents.OpenAIResponsesModel(model=MODEL_NAME, openai_client=async_client)
    caller = agents.Agent(name="caller", instructions="Look the weather up.", tools=[get_weather], model=model,
                          tool_use_behavior="stop_on_first_tool",
                          model_settings=agents.ModelSettings(tool_choice="required", max_tokens=400, temperature=0))
    answerer = agents.Agent(name="answerer", instructions="Say whether it is sunny.", model=model,
                            output_type=Forecast, model_settings=agents.ModelSettings(max_tokens=60, temperature=0))

    async def run() -> tuple[Any, Any]:
        called = await agents.Runner.run(caller, QUESTION, max_turns=2)
        follow_up = called.to_input_list() + [{"role": "user", "content": "So, is it sunny?"}]
        return called, await agents.Runner.run(answerer, follow_up, max_turns=1)

    called, answered = asyncio.run(run())
    assert len(cities) == 1 and called.final_output == f"Clear skies in {cities[0]}."
    assert [item.type for item in called.new_items] == ["tool_call_item", "tool_call_output_item"]
    assert called.raw_responses[0].response_id.startswith("resp_")
    assert isinstance(answered.final_output, Forecast)
