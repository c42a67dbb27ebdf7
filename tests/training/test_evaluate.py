"""Scoring for `quiver eval`: reading prompts, each metric, the summary, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.evaluate import (
    EvalCase,
    EvalInputError,
    cases_from_chats,
    format_table,
    parse_case,
    parse_cases,
    plot_scores,
    read_cases,
    schema_valid,
    score,
    summarize,
)

SCHEMA = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}


def test_a_prompt_line_becomes_one_user_message_and_asks_only_for_what_it_names() -> None:
    case = parse_case(json.dumps({"prompt": "Hi?", "expected": "Hello"}), 3)
    assert case.line == 3 and case.messages == [{"role": "user", "content": "Hi?"}]
    assert case.metrics() == ["exact_match"]
    chat = parse_case(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                  "schema": SCHEMA, "regex": "^{"}), 1)
    assert chat.metrics() == ["json_valid", "schema_valid", "regex_match"]  # a schema implies JSON
    assert parse_case('{"prompt": "x", "json": true}', 1).metrics() == ["json_valid"]
    assert parse_case('{"prompt": "x"}', 1).metrics() == []


def test_a_non_string_expected_answer_is_its_json_text() -> None:
    case = parse_case(json.dumps({"prompt": "x", "expected": {"a": 1}}), 1)
    assert case.expected == '{"a": 1}'
    assert score(case, ' {"a": 1}\n') == {"exact_match": True}


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "fine", "expected": "x"}',
        "not json",
        "",
        '{"prompt": "x", "regex": "("}',
        '{"prompt": "x", "schema": {"type": "nonsense"}}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        '{"prompt": "x", "messages": []}',
        '{"prompt": "x", "expect": "typo"}',
        '["a list"]',
        '{"prompt": "x", "json": "yes"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalInputError) as caught:
        read_cases(path)
    assert [line for line, _ in caught.value.problems] == [2, 4, 5, 6, 7, 8, 9, 10]
    text = str(caught.value)
    assert "line 2: not valid JSON" in text and "line 8: unknown key(s) ['expect']" in text
    assert "not a valid regular expression" in text and "not a valid JSON schema" in text


def test_an_empty_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="empty"):
        parse_cases(["", "  "])
    with pytest.raises(EvalInputError, match="cannot read"):
        read_cases(tmp_path / "missing.jsonl")


def test_each_metric_scores_the_answer() -> None:
    case = EvalCase(line=1, messages=[], expected='{"topic": "a"}', json=True, schema=SCHEMA, regex=r'"topic": "\w+"')
    assert score(case, '  {"topic": "a"}  ') == {"exact_match": True, "json_valid": True, "schema_valid": True,
                                                 "regex_match": True}
    assert score(case, '{"topic": 1}') == {"exact_match": False, "json_valid": True, "schema_valid": False,
                                           "regex_match": False}
    assert score(case, '{"topic": "sea", "ans') == {"exact_match": False, "json_valid": False, "schema_valid": False,
                                                "regex_match": True}
    assert score(case, None) == dict.fromkeys(case.metrics(), False)  # a failed request fails everything
    assert not schema_valid("[]", SCHEMA)


def test_validation_chats_become_cases_with_their_last_answer_expected() -> None:
    records = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": '{"a": 1}'}]},
        {"text": "continued pre-training is skipped"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "plain", "weight": 0}]},
        {"messages": [{"role": "assistant", "content": "no prompt before it"}]},
    ]
    cases = cases_from_chats(records)
    assert [c.line for c in cases] == [1, 3]
    assert cases[0].messages == [{"role": "user", "content": "q1"}] and cases[0].metrics() == ["exact_match",
                                                                                                "json_valid"]
    assert cases[1].expected == "plain" and cases[1].metrics() == ["exact_match"]
    assert [m["role"] for m in cases[1].messages] == ["system", "user"]


def _rows() -> list[dict[str, object]]:
    return [
        {"model": "base", "scores": {"exact_match": False, "json_valid": False}, "error": None},
        {"model": "base", "scores": {"regex_match": True}, "error": None},
        {"model": "ft", "scores": {"exact_match": True, "json_valid": True}, "error": None},
        {"model": "ft", "scores": {"regex_match": False}, "error": "500: boom"},
    ]


def test_the_summary_counts_each_metric_only_where_it_was_asked() -> None:
    summary = summarize(_rows(), ["base", "ft"])
    assert summary["base"]["exact_match"] == {"passed": 0, "total": 1, "rate": 0.0}
    assert summary["ft"]["json_valid"] == {"passed": 1, "total": 1, "rate": 1.0}
    assert summary["base"]["regex_match"]["rate"] == 1.0
    assert "schema_valid" not in summary["base"]
    assert summary["ft"]["errors"] == {"count": 1, "total": 2}


def test_the_table_puts_models_side_by_side() -> None:
    table = format_table(summarize(_rows(), ["base", "ft"]), ["base", "ft"]).splitlines()
    assert table[0].split() == ["metric", "base", "ft"]
    exact = next(line for line in table if line.startswith("exact_match"))
    assert exact.split() == ["exact_match", "0.00", "(0/1)", "1.00", "(1/1)"]
    assert not any(line.startswith("schema_valid") for line in table)
    assert table[-1].split() == ["request", "errors", "0/2", "1/2"]


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "scores.png"
    assert plot_scores(summarize(_rows(), ["base", "ft"]), ["base", "ft"], path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "scores.png"
    note = plot_scores(summarize(_rows(), ["base"]), ["base"], path)
    assert note is not None and "matplotlib" in note and not path.exists()
