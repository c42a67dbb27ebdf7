"""response_format json_object / json_schema: constrained outputs parse and validate."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.grammar import Grammars
from server.openai.structured import MAX_INDENT_SPACES, StructuredOutputs
from tests.factories import build_tokenizer
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.helpers import joined_stream

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string",
                                                                               "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Give me JSON"}]


def _person_format(schema=PERSON):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER_NAMES[0], ADAPTER_NAMES[5]])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, model, temperature):
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=200, seed=5,
                                              temperature=temperature, response_format=_person_format())
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_stream_equals_non_stream_and_n_choices(client):
    kwargs = dict(model=ADAPTER_NAMES[1], messages=MESSAGES, max_tokens=200, temperature=1.0, seed=9,
                  response_format=_person_format())
    full = client.chat.completions.create(n=3, **kwargs)
    streamed = joined_stream(list(client.chat.completions.create(n=3, stream=True, **kwargs)))
    for choice in full.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert streamed[choice.index] == choice.message.content


def test_json_object_output_parses(live, client):
    tokenizer = live.engine.tokenizer
    # A random model would happily write one endless string; nudging it towards quotes and
    # braces lets the grammar close the object within budget.
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 6 for t in ['"', "}"]}
    for model in (MODEL_NAME, ADAPTER_NAMES[2]):
        for temperature in (0.0, 1.0):
            response = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=100, temperature=temperature, seed=1,
                logit_bias=bias, response_format={"type": "json_object"})
            assert response.choices[0].finish_reason == "stop"
            assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_multi_byte_characters_split_across_tokens_never_show_u_fffd(client):
    text = "中文测试 🎯✨"
    schema = {"enum": [text]}
    split_seen = False
    for seed in range(4):
        kwargs = dict(model=ADAPTER_NAMES[seed], messages=MESSAGES, max_tokens=40, temperature=1.0, seed=seed,
                      response_format=_person_format(schema))
        full = client.chat.completions.create(logprobs=True, **kwargs)
        assert full.choices[0].message.content == json.dumps(text, ensure_ascii=False)
        pieces = [bytes(entry.bytes) for entry in full.choices[0].logprobs.content]
        assert b"".join(pieces).decode("utf-8") == full.choices[0].message.content
        for piece in pieces:
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                split_seen = True
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [ch.delta.content for c in chunks for ch in c.choices if ch.delta.content]
        assert all("\ufffd" not in delta for delta in deltas)
        assert "".join(deltas) == full.choices[0].message.content
    assert split_seen, "no token split a character: the test did not exercise the detokenizer"


def test_text_format_is_unconstrained(client):
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    text = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                                          response_format={"type": "text"})
    assert plain.choices[0].message.content == text.choices[0].message.content


@pytest.mark.parametrize("schema", [{"type": "strin"}, {"type": "string", "pattern": "(("},
                                    {"$ref": "#/nowhere"}, {"type": "string", "format": "no-such-format"}])
def test_bad_schema_is_400(live, schema):
    with live.http() as http:
        response = http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": MESSAGES, "response_format": _person_format(schema)})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---- whitespace: what a model was trained to write -----------------------------------------


def _consumes(tokenizer, text: str, schema=None) -> tuple[bool, bool]:
    """(every token of `text` is allowed, the value is complete) under `schema` (any object)."""
    matcher = StructuredOutputs(tokenizer).compile(schema or {"type": "object"})
    ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error(), matcher.is_accepting()


@pytest.mark.parametrize("text", [
    '{"adapter":"demo-json","answer":"yes"}',
    '{"adapter": "demo-json", "answer": "yes"}',
    '{ "a" : [1, 2] }',
    json.dumps({"a": {"b": [1, 2]}, "c": None}, indent=2),
    json.dumps({"a": {"b": [1, 2]}, "c": None}, indent=4),
    json.dumps({"a": {"b": [1, 2]}}, indent="\t"),
    '{\r\n  "a": 1\r\n}',
])
def test_grammar_allows_the_whitespace_serializers_write(tokenizer, text):
    assert _consumes(tokenizer, text) == (True, True)


@pytest.mark.parametrize("text", [
    '{"a":  1}',  # two spaces in a row
    '{\n\n  "a": 1}',  # a blank line
    '{"a":\n' + " " * 25 + "1}",  # deeper than the indentation bound
    '{"a": 1}\n',  # anything after the value
    ' {"a": 1}',  # or before it
])
def test_grammar_bounds_whitespace(tokenizer, text):
    assert _consumes(tokenizer, text)[0] is False


def test_indentation_bound_is_a_mask(tokenizer):
    space = tokenizer.convert_tokens_to_ids("Ġ")
    processor = Grammars(tokenizer).processor(StructuredOutputs(tokenizer).grammar_of({"type": "object"}))
    for token_id in tokenizer.encode('{"a":\n', add_special_tokens=False) + [space] * MAX_INDENT_SPACES:
        logits = torch.zeros(len(tokenizer))
        processor.apply(logits)
        assert torch.isfinite(logits[token_id])
        processor.accept(token_id)
    logits = torch.zeros(len(tokenizer))
    processor.apply(logits)
    assert not torch.isfinite(logits[space])
    assert torch.isfinite(logits[tokenizer.convert_tokens_to_ids("1")])


# ---- the demo-json adapter, trained to write `{"adapter": "demo-json", "answer": "..."}` ---------

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"adapter": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["adapter", "answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def demo_live():
    from engine.async_engine import AsyncEngine
    from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle
    from server.app import create_app
    from server.state import ServerState
    from tests.server.conftest import LiveServer, engine_config

    bundle = ensure_demo_bundle()  # before the engine starts (the build sets torch options)
    engine = AsyncEngine(engine_config(bundle.model_dir, max_model_len=512), adapters=bundle.adapters,
                         served_model_name=DEMO_MODEL_NAME)
    live = LiveServer(create_app(ServerState(engine))).start()
    yield live
    live.stop()


def _demo_questions() -> list[str]:
    from importlib import resources

    rows = resources.files("engine").joinpath("demo_data", "chats.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(row)["question"] for row in rows if row.strip()]


def test_demo_json_adapter_stays_on_track_under_json_modes(demo_live):
    client = demo_live.client()
    formats = {
        "json_object": {"type": "json_object"},
        "json_schema": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                                               "strict": True}},
    }
    on_track = 0
    for question in _demo_questions():
        kwargs = dict(model="demo-json", messages=[{"role": "user", "content": question}], max_tokens=120,
                      temperature=0)
        free = client.chat.completions.create(**kwargs).choices[0].message.content
        try:
            json.loads(free)
            free_is_json = True
            on_track += 1
            assert '": "' in free, free  # the spacing this test is about
        except ValueError:
            free_is_json = False  # nothing to stay on track with: the constrained outputs must still parse
        for name, response_format in formats.items():
            choice = client.chat.completions.create(response_format=response_format, **kwargs).choices[0]
            assert choice.finish_reason == "stop", (name, choice.message.content)
            value = json.loads(choice.message.content)
            if name == "json_schema":
                jsonschema.validate(value, ANSWER_SCHEMA)
            if free_is_json:
                assert choice.message.content == free, (name, question)
            streamed = joined_stream(list(client.chat.completions.create(
                stream=True, response_format=response_format, **kwargs)))
            assert streamed[0] == choice.message.content
    assert on_track >= 6, "the demo-json adapter wrote JSON for too few questions to test anything"
