"""A streaming scanner of one tool-call JSON object, read a character at a time (used by every
format's parser in this package: server/tool_parsers/base.py)."""

from __future__ import annotations

import json

WHITESPACE = " \t\r\n"


class CallScanner:
    """Reads one call object (`{"name": ..., "arguments": {...}}`) a character at a time.

    Tracks only the top level of the object: the `name` value is decoded once complete, the
    arguments value (under any of `args_keys`) is passed on as raw text while it streams.
    `push` returns False once the object is closed (that character was consumed) or broken.
    """

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self._args_keys = args_keys
        self.name: str | None = None
        self.args_pieces: list[str] = []  # raw arguments text not yet taken by the caller
        self.saw_args = False
        self.done = False
        self.error = False
        self._started = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._state = "key"  # key | colon | value | comma
        self._key: list[str] = []
        self._value: list[str] = []
        self._value_key = ""
        self._value_kind = ""  # "" (not started) | "container" | "string" | "scalar"

    def push(self, ch: str) -> bool:
        if self.done or self.error:
            return False
        if not self._started:
            if ch in WHITESPACE:
                return True
            if ch != "{":
                return self._fail()
            self._started, self._depth = True, 1
            return True
        if self._state == "value":
            return self._push_value(ch)
        if self._in_string:  # a key
            self._scan_string_char(ch)
            if self._in_string:
                self._key.append(ch)
            return True
        if ch in WHITESPACE:
            return True
        if self._state == "key":
            if ch == '"':
                self._in_string, self._key = True, []
                self._state = "colon"
                return True
            if ch == "}":
                return self._close()
            return self._fail()
        if self._state == "colon":
            if ch != ":":
                return self._fail()
            self._state, self._value, self._value_kind = "value", [], ""
            self._value_key = "".join(self._key)
            return True
        # comma
        if ch == ",":
            self._state = "key"
            return True
        if ch == "}":
            return self._close()
        return self._fail()

    def _push_value(self, ch: str) -> bool:
        if not self._value_kind:
            if ch in WHITESPACE:
                return True
            self._value_kind = "container" if ch in "{[" else "string" if ch == '"' else "scalar"
            if self._value_kind == "string":
                self._in_string = True
            elif self._value_kind == "container":
                self._depth += 1
            self._take(ch)
            return True
        if self._value_kind == "scalar" and not self._in_string and ch in ",}" + WHITESPACE:
            self._end_value()
            return self.push(ch)
        if self._in_string:
            self._scan_string_char(ch)
            self._take(ch)
            if not self._in_string and self._value_kind == "string":
                self._end_value()
            return True
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        self._take(ch)
        if self._value_kind == "container" and self._depth == 1:
            self._end_value()
        return True

    def _scan_string_char(self, ch: str) -> None:
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False

    def _take(self, ch: str) -> None:
        self._value.append(ch)
        if self._value_key in self._args_keys and self._value_kind == "container":
            self.args_pieces.append(ch)

    def _end_value(self) -> None:
        raw = "".join(self._value)
        if self._value_key == "name":
            try:
                name = json.loads(raw)
            except ValueError:
                name = None
            if not isinstance(name, str):
                self._fail()
                return
            self.name = name
        elif self._value_key in self._args_keys:
            self.saw_args = True
            if self._value_kind == "string":  # arguments written as a JSON string holding the object
                try:
                    self.args_pieces.append(json.loads(raw))
                except ValueError:
                    self._fail()
                    return
            elif self._value_kind == "scalar":
                self.args_pieces.append(raw)
        self._state = "comma"

    def _close(self) -> bool:
        self.done = True
        return False

    def _fail(self) -> bool:
        self.error = True
        return False
