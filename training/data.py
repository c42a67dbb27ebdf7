"""Read and check training JSONL before anything expensive happens.

Two formats, one example per line (blank lines are skipped):

- chat, as in OpenAI's chat fine-tuning: `{"messages": [{"role": ..., "content": ...}, ...]}`;
  the loss covers assistant turns only, and an assistant message with `"weight": 0` is not learned;
- text, for continued pre-training: `{"text": "..."}`; every token is learned.

Every problem is reported with its 1-based line number. This module needs no tokenizer (and
imports no torch), so the server can check an upload at once; the token-length check
happens in `training.encoding` once the tokenizer is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES: tuple[str, ...] = ("system", "user", "assistant")
MAX_REPORTED_ISSUES = 20
_MESSAGE_KEYS = {"role", "content", "name", "weight"}
_UNSUPPORTED_MESSAGE_KEYS = {
    "tool_calls": "tool calls are not supported",
    "function_call": "function calls are not supported",
    "refusal": "refusals are not supported",
}


@dataclass(frozen=True)
class ChatRecord:
    line: int
    messages: list[dict[str, Any]]  # {"role", "content": str, "weight": 0 | 1}


@dataclass(frozen=True)
class TextRecord:
    line: int
    text: str


Record = ChatRecord | TextRecord


@dataclass(frozen=True)
class DataIssue:
    line: int  # 0: the file as a whole
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


class DataError(ValueError):
    """A data file has problems; `issues` lists the first of them with their line numbers.

    param: which input the file came in as (`training_file` / `validation_file` for jobs).
    """

    def __init__(self, label: str, issues: list[DataIssue], total: int | None = None,
                 param: str | None = None) -> None:
        self.label = label
        self.issues = issues
        self.total = max(total or 0, len(issues))
        self.param = param
        lines = [f"{label}: {issue}" for issue in issues]
        if self.total > len(issues):
            lines.append(f"{label}: ... and {self.total - len(issues)} more problem(s)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class FileSummary:
    examples: int
    chat: int
    text: int
    sha256: str


def read_records(path: Path, label: str | None = None, param: str | None = None) -> list[Record]:
    """Every example of `path`, or a DataError naming the lines that are wrong."""
    path = Path(path)
    label = label or path.name
    records: list[Record] = []
    issues: list[DataIssue] = []
    total = 0
    try:
        for line_no, raw in _lines(path):
            try:
                record = parse_line(raw, line_no)
            except _Bad as bad:
                total += 1
                if len(issues) < MAX_REPORTED_ISSUES:
                    issues.append(DataIssue(line_no, str(bad)))
                continue
            if record is not None:
                records.append(record)
    except OSError as exc:
        raise DataError(label, [DataIssue(0, f"cannot read the file: {exc.strerror or exc}")], param=param) from exc
    if issues:
        raise DataError(label, issues, total, param=param)
    if not records:
        raise DataError(label, [DataIssue(0, "the file has no examples")], param=param)
    return records


def summarize(path: Path, label: str | None = None, param: str | None = None) -> FileSummary:
    """Check `path` and count its examples (what the files API stores with an upload)."""
    records = read_records(path, label, param)
    chat = sum(isinstance(r, ChatRecord) for r in records)
    return FileSummary(examples=len(records), chat=chat, text=len(records) - chat, sha256=file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Bad(ValueError):
    """One line's problem; becomes a DataIssue."""


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark some editors write
            yield line_no, raw


def parse_line(raw: bytes | str, line: int) -> Record | None:
    """One line as a record; None for a blank line; `_Bad` with the reason otherwise."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f"not UTF-8 text (byte {exc.start})") from None
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _Bad("JSON nested too deeply to read") from None
    except ValueError:  # the only other failure: an integer past Python's digit limit
        raise _Bad(f"not valid JSON: an integer longer than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {_kind(obj)}")
    has_messages, has_text = "messages" in obj, "text" in obj
    if has_messages and has_text:
        raise _Bad("has both `messages` and `text`; give one (chat or plain text)")
    if has_text:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise _Bad(f"`text` must be a non-empty string, got {_kind(text)}")
        return TextRecord(line, text)
    if not has_messages:
        raise _Bad("expected a `messages` list (chat) or a `text` string (plain text)")
    return ChatRecord(line, _check_messages(obj["messages"]))


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _Bad(f"`messages` must be a non-empty list, got {_kind(messages)}")
    checked: list[dict[str, Any]] = []
    seen_other = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Bad(f"{where} must be an object, got {_kind(message)}")
        for key, reason in _UNSUPPORTED_MESSAGE_KEYS.items():
            if message.get(key):
                raise _Bad(f"{where}: {reason}")
        unknown = sorted(set(message) - _MESSAGE_KEYS - set(_UNSUPPORTED_MESSAGE_KEYS))
        if unknown:
            raise _Bad(f"{where} has unknown key(s) {unknown}; expected role, content, name, weight")
        role = message.get("role")
        if role not in ROLES:
            raise _Bad(f"{where} has role {role!r}; expected one of {list(ROLES)}")
        if role == "system" and seen_other:
            raise _Bad(f"{where} is a system message after the conversation started; "
                       "system messages go first")
        seen_other = seen_other or role != "system"
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise _Bad(f"{where} has weight {weight!r}; expected 0 or 1")
        if "weight" in message and role != "assistant":
            raise _Bad(f"{where}: weight is only allowed on assistant messages")
        checked.append({"role": role, "content": _content(message.get("content"), where), "weight": weight})
    assistant = [m for m in checked if m["role"] == "assistant"]
    if not assistant:
        raise _Bad("no assistant turn: a chat example needs an assistant message to learn from")
    if not any(m["weight"] for m in assistant):
        raise _Bad("no assistant turn to learn from: every assistant message has weight 0")
    first = next(m for m in checked if m["role"] != "system")
    if first["role"] != "user":
        raise _Bad("the conversation starts with an assistant turn; the first message after any "
                   "system messages must be a user message")
    return checked


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # OpenAI's content parts; only text can be trained on here.
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise _Bad(f"{where}.content[{j}] is {kind!r}; only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _Bad(f"{where}.content must be a string, got {_kind(content)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
