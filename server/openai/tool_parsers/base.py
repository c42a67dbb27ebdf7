"""What every tool-call format shares: calls, deltas and the parser base (the call scanner is in scanner.py).

A format's parser reads model output incrementally: `feed(text)` returns the content that is
certainly not call markup and the `delta.tool_calls` entries that became known, `finish()`
flushes what was held back. The first delta of a call carries its id and name (once the name's
string is complete), later ones carry pieces of `arguments` as the model writes them. Text that
could still turn into markup (a partial `<tool_call>`, a JSON object that may be a call) is held
back, so markup never reaches `content`. A full-text parse is the same parser fed all at once,
so streamed and unstreamed answers cannot differ.

Detokenized text has special tokens removed, so the parsers whose markers are special tokens in
their model family (`[TOOL_CALLS]`, `<|python_tag|>`) also recognise the call JSON without them.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from server.openai.tool_parsers.scanner import WHITESPACE as _WHITESPACE
from server.openai.tool_parsers.scanner import CallScanner


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str = field(default_factory=new_call_id)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One `delta.tool_calls` entry: the first of a call has id and name, later ones arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None  # None when only calls were made
    calls: list[ToolCall]


class StreamingToolParser:
    """The incremental parser of one choice; formats subclass it and implement `_step`.

    `_step()` consumes from `self._buffer` and returns False when it needs more text. Content
    goes through `_emit_text`, which holds whitespace back while calls may follow, so the blank
    lines between calls never become content.
    """

    args_keys: ClassVar[tuple[str, ...]] = ("arguments",)

    def __init__(self, max_calls: int | None = None) -> None:
        self._max_calls = max_calls
        self._buffer = ""
        self._final = False
        self._content: list[str] = []
        self._held_space = ""
        self._deltas: list[ToolCallDelta] = []
        self._scanner: CallScanner | None = None
        self._raw_call = ""  # the current call's text, given back as content if it is not a call
        self._announced = False
        self._call_id = ""
        self._call_args: list[str] = []
        self.calls: list[ToolCall] = []
        self._call_count = 0  # calls seen, kept or dropped past max_calls

    # -- public -------------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        self._final = True
        while self._step():
            pass
        self._flush_end()
        return self._take()

    @property
    def saw_calls(self) -> bool:
        return bool(self.calls) or self._announced

    # -- for subclasses -----------------------------------------------------------------

    def _step(self) -> bool:
        raise NotImplementedError

    def _flush_end(self) -> None:
        """At the end: an unfinished call that never showed a name is given back as text."""
        if self._scanner is not None and not self._announced:
            self._emit_text(self._raw_call)
        elif self._scanner is not None:
            self._complete_call()
        self._scanner = None
        self._emit_text(self._buffer)
        self._buffer = ""
        if not self.saw_calls:
            self._content.append(self._held_space)
        self._held_space = ""

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        stripped = text.rstrip(_WHITESPACE)
        if not stripped:
            self._held_space += text
            return
        self._content.append(self._held_space + stripped)
        self._held_space = text[len(stripped):]

    def _drop_held_space(self) -> None:
        self._held_space = ""

    def _start_call(self, raw_prefix: str = "") -> None:
        self._scanner = CallScanner(self.args_keys)
        self._raw_call = raw_prefix
        self._announced = False
        self._call_args = []

    def _scan_call(self) -> bool | None:
        """Feed the buffer to the current call. True: the call closed; False: it broke (its raw text is
        back in the buffer for the caller to decide); None: more text is needed."""
        scanner = self._scanner
        assert scanner is not None
        used = 0
        for ch in self._buffer:
            used += 1
            if not scanner.push(ch):
                if scanner.error:
                    used -= 1
                break
        self._raw_call += self._buffer[:used]
        self._buffer = self._buffer[used:]
        self._announce(scanner)
        if scanner.error:
            if self._announced:  # too late to give it back: end the call with what it has
                self._complete_call()
                return True
            self._buffer = self._raw_call + self._buffer
            self._scanner = None
            return False
        if scanner.done:
            if scanner.name is None:  # an object, not a call
                self._buffer = self._raw_call + self._buffer
                self._scanner = None
                return False
            self._complete_call()
            return True
        return None

    def _announce(self, scanner: CallScanner) -> None:
        if scanner.name is not None and not self._announced:
            self._announced = True
            self._drop_held_space()
            self._call_count += 1
            self._call_id = new_call_id()
            if self._keeps_call():
                self._deltas.append(ToolCallDelta(len(self.calls), self._call_id, scanner.name, ""))
        if self._announced and scanner.args_pieces:
            piece = "".join(scanner.args_pieces)
            scanner.args_pieces.clear()
            self._call_args.append(piece)
            if self._keeps_call():
                self._deltas.append(ToolCallDelta(len(self.calls), arguments=piece))

    def _keeps_call(self) -> bool:
        return self._max_calls is None or self._call_count <= self._max_calls

    def _complete_call(self) -> None:
        scanner = self._scanner
        assert scanner is not None
        self._scanner = None
        if not self._keeps_call():
            return
        if not scanner.saw_args and not self._call_args:
            self._call_args.append("{}")
            self._deltas.append(ToolCallDelta(len(self.calls), arguments="{}"))
        self.calls.append(ToolCall(scanner.name or "", "".join(self._call_args), self._call_id))

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (held back)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolParser:
    """A tool-call format: how calls are written, parsed, prompted for and forced by a grammar."""

    name: ClassVar[str]
    stream_class: ClassVar[type[StreamingToolParser]]
    args_key: ClassVar[str] = "arguments"

    def call_schema(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """The JSON schema of one call object of this format to `name` with `parameters`."""
        return {
            "type": "object",
            "properties": {"name": {"const": name}, self.args_key: parameters},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        }

    def stream(self, max_calls: int | None = None) -> StreamingToolParser:
        return self.stream_class(max_calls)

    def parse(self, text: str, max_calls: int | None = None) -> ParsedOutput:
        """The whole output at once: calls whose arguments are valid JSON, else all of it as content."""
        parser = self.stream(max_calls)
        first, _ = parser.feed(text)
        rest, _ = parser.finish()
        content = first + rest
        if not parser.calls:
            return ParsedOutput(text, [])
        for call in parser.calls:
            try:
                json.loads(call.arguments)
            except ValueError:
                return ParsedOutput(text, [])
        return ParsedOutput(content if content.strip() else None, parser.calls)

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        """Calls (name, arguments as a dict) in this format: earlier assistant turns in a prompt."""
        raise NotImplementedError

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """A system prompt offering `tools` (OpenAI function dicts) for templates that ignore tools."""
        raise NotImplementedError

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance) for one call, or several with `parallel`, each matching one
        of `call_schemas` (JSON schemas of the call object)."""
        raise NotImplementedError


def tools_json_lines(tools: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)


MAX_PARALLEL_CALLS = 8  # calls a forced grammar allows in one answer


def lark_json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)
