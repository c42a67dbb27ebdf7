"""The tool-call parsers: each format parsed whole and streamed in pieces split anywhere."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from server.openai.tool_parsers import PARSERS, detect_parser, parser_named
from tests.factories import build_tokenizer

WEATHER = '{"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}'

# (parser, model output, expected content, expected calls as (name, arguments dict))
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', None,
     [("get_weather", json.loads(WEATHER))]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
               '<tool_call>\n{"arguments": {}, "name": "b"}\n</tool_call>\n', "Let me look.",
     [("a", {"x": 1}), ("b", {})]),
    ("hermes", '<tool_call>{"name":"c"}</tool_call>', None, [("c", {})]),
    ("hermes", "No tools: 1 < 2 and <tool_ is not a tag.", "No tools: 1 < 2 and <tool_ is not a tag.", []),
    ("hermes", '<tool_call>{"city": "Paris"}</tool_call>', '<tool_call>{"city": "Paris"}</tool_call>', []),
    ("llama3_json", f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}', None,
     [("get_weather", json.loads(WEATHER))]),
    ("llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', None,
     [("a", {"x": 1}), ("b", {})]),
    ("llama3_json", '{"adapter": "demo-json", "answer": "A quiver."}', '{"adapter": "demo-json", "answer": "A quiver."}',
     []),
    ("llama3_json", "Plain {text} here.", "Plain {text} here.", []),
    ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}]', None,
     [("get_weather", json.loads(WEATHER))]),
    ("mistral", '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', None,
     [("a", {"x": 1}), ("b", {})]),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": "]"}}]', "Sure.", [("a", {"x": "]"})]),
    ("mistral", "[1, 2] is a list.", "[1, 2] is a list.", []),
]
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"name"')


def _calls(parsed):
    return [(call.name, json.loads(call.arguments)) for call in parsed.calls]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_full_text_parse(name, text, content, calls):
    parsed = parser_named(name).parse(text)
    assert parsed.content == content
    assert _calls(parsed) == calls
    assert len({call.id for call in parsed.calls}) == len(calls)
    assert all(call.id.startswith("call_") for call in parsed.calls)


def _stream(name, pieces):
    parser = parser_named(name).stream()
    contents, deltas = [], []
    for piece in pieces:
        text, new = parser.feed(piece)
        contents.append(text)
        deltas += new
    text, new = parser.finish()
    return contents + [text], deltas


def _reassemble(deltas):
    calls: dict[int, dict] = {}
    for delta in deltas:
        entry = delta.to_dict()
        if delta.index not in calls:  # the first delta of a call names it
            assert entry["id"].startswith("call_") and entry["type"] == "function"
            assert entry["function"]["name"] and entry["function"]["arguments"] == ""
            calls[delta.index] = {"name": entry["function"]["name"], "arguments": ""}
        else:
            assert "id" not in entry and "name" not in entry["function"]
            calls[delta.index]["arguments"] += entry["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_streamed_split_at_every_boundary_equals_full_parse(name, text, content, calls):
    splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        contents, deltas = _stream(name, pieces)
        assert "".join(contents) == (content or "")
        if calls:
            assert not any(marker in piece for piece in contents for marker in MARKUP), contents
        assert _reassemble(deltas) == calls


def test_arguments_arrive_in_pieces_as_the_model_writes_them():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    _, deltas = _stream("hermes", list(text))
    assert deltas[0].name == "get_weather"
    assert len(deltas) > 5 and "".join(d.arguments for d in deltas) == '{"city": "Paris"}'


def test_parallel_false_keeps_only_the_first_call():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    parser = parser_named("hermes")
    assert [c.name for c in parser.parse(text, max_calls=1).calls] == ["a"]
    stream = parser.stream(max_calls=1)
    content, deltas = stream.feed(text)
    assert content == "" and {d.index for d in deltas} == {0}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_rendered_calls_parse_back(name):
    parser = parser_named(name)
    calls = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert _calls(parser.parse(parser.render_calls(calls))) == calls


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_forced_grammar_accepts_the_format_and_refuses_other_functions(name):
    parser = parser_named(name)
    tokenizer = build_tokenizer()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=tokenizer.eos_token_id)
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    grammar = llguidance.LLMatcher.grammar_from_lark(parser.grammar([parser.call_schema("get_weather", parameters)],
                                                                    parallel=True))

    def accepts(text):
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()

    good = parser.render_calls([("get_weather", {"city": "Paris"})] * 2).replace("[TOOL_CALLS]", "")
    assert accepts(good.replace(", ", ",").replace(": ", ":"))  # compact JSON
    assert not accepts(good.replace("get_weather", "get_time"))
    assert not accepts(parser.render_calls([("get_weather", {"town": "Paris"})]).replace("[TOOL_CALLS]", ""))


def test_the_chat_template_picks_the_parser():
    assert detect_parser("{{ '<tool_call>' }}").name == "hermes"
    assert detect_parser(None).name == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' + tool_calls|tojson }}").name == "mistral"
    assert detect_parser("{% if message.role == 'ipython' %}{{ '<|python_tag|>' }}{% endif %}").name == "llama3_json"
    with pytest.raises(ValueError, match="'nope'.*hermes, llama3_json, mistral"):
        parser_named("nope")
