"""Bad training data is refused before training, each problem with its line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import MAX_REPORTED_ISSUES, ChatRecord, DataError, TextRecord, read_records, summarize

GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _write(tmp_path: Path, lines: list[str | dict], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _single_issue(tmp_path: Path, bad: str | dict) -> tuple[int, str]:
    """Put `bad` on line 3 between good lines; return (line, reason) of the one problem found."""
    path = _write(tmp_path, [GOOD_CHAT, {"text": "plain"}, bad, GOOD_CHAT])
    with pytest.raises(DataError) as info:
        read_records(path)
    assert len(info.value.issues) == 1
    issue = info.value.issues[0]
    assert f"train.jsonl: line {issue.line}:" in str(info.value)
    return issue.line, issue.reason


def test_reads_chat_and_text_records_with_their_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, [GOOD_CHAT, "", {"text": "Once upon a time."}, "   "])
    records = read_records(path)
    assert [type(r) for r in records] == [ChatRecord, TextRecord]
    assert [r.line for r in records] == [1, 3]
    assert records[0].messages[1] == {"role": "assistant", "content": "Hello", "weight": 1}
    summary = summarize(path)
    assert (summary.examples, summary.chat, summary.text) == (2, 1, 1)
    assert len(summary.sha256) == 64


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ({"prompt": "x", "completion": "y"}, "expected a `messages` list"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]}, "role 'tool'"),
        ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "role None"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "b"}]}, "starts with an assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "system messages go first"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
         "every assistant message has weight 0"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
         "weight 2"),
        ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
         "weight is only allowed on assistant"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
         "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
         "tool calls are not supported"),
        ({"messages": [{"role": "user", "content": "q", "colour": "red"}, {"role": "assistant", "content": "a"}]},
         "unknown key(s) ['colour']"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"text": ""}, "`text` must be a non-empty string"),
        ({"text": 3}, "`text` must be a non-empty string"),
        ({**GOOD_CHAT, "text": "x"}, "has both"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                       {"role": "assistant", "content": "a"}]}, "only text parts"),
    ],
)
def test_each_bad_line_is_reported_with_its_number_and_reason(tmp_path: Path, bad: str | dict, reason: str) -> None:
    line, message = _single_issue(tmp_path, bad)
    assert line == 3
    assert reason in message


def test_text_content_parts_are_joined(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "a"}]}])
    (record,) = read_records(path)
    assert isinstance(record, ChatRecord) and record.messages[0]["content"] == "Hello there"


def test_every_problem_is_listed_up_to_a_cap(tmp_path: Path) -> None:
    lines: list[str | dict] = [GOOD_CHAT] + ["not json"] * (MAX_REPORTED_ISSUES + 5)
    with pytest.raises(DataError) as info:
        read_records(_write(tmp_path, lines), param="training_file")
    error = info.value
    assert [i.line for i in error.issues] == list(range(2, 2 + MAX_REPORTED_ISSUES))
    assert error.total == MAX_REPORTED_ISSUES + 5
    assert "and 5 more problem(s)" in str(error)
    assert error.param == "training_file"


def test_empty_file_has_no_examples(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_records(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the file"):
        read_records(tmp_path / "nope.jsonl")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2: not UTF-8"):
        read_records(path)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode() + b"\n")
    assert len(read_records(path)) == 1


def test_the_shipped_example_dataset_is_valid() -> None:
    path = Path(__file__).resolve().parents[2] / "training" / "examples" / "json_answers.jsonl"
    records = read_records(path)
    assert 30 <= len(records) <= 100
    for record in records:
        assert isinstance(record, ChatRecord)
        answer = json.loads(record.messages[-1]["content"])
        assert set(answer) == {"topic", "answer"}
