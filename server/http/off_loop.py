"""Work a large request needs before the engine sees it, kept off the event loop.

Decoding, validating, templating and tokenizing a body of many megabytes takes seconds of
CPU; on the event loop that would stall every other request, `/health` included. Bodies
over `OFF_LOOP_BYTES` are handled on a small pool of worker threads instead.

Moving work to a thread only helps while that work lets go of the GIL now and then. The
C JSON decoder holds it for the whole document, which is seconds for 16 MiB of `[1],` (the
cost follows the number of values, not the bytes), so `loads` uses it only where the bytes
bound the number of values low enough, and otherwise decodes with the pure-Python scanner,
which lets the event loop in every few milliseconds and gives up past `MAX_JSON_VALUES` values
or `MAX_JSON_CONTAINERS` arrays and objects. The second bound is for the garbage collector: a
few hundred thousand new containers set off a full collection, which holds the GIL for as long
as it takes to walk every object of the process (hundreds of milliseconds in a server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import json
import json.decoder
import json.scanner
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Bodies at least this large are decoded, validated and tokenized on a worker thread.
OFF_LOOP_BYTES = 64 * 1024
# Worker threads shared by all requests' off-loop work; more would only queue on the GIL.
OFF_LOOP_THREADS = 4
# Up to this many values the C decoder holds the GIL for well under 20 ms.
_C_DECODER_MAX_VALUES = 65_536
# No request needs more (prompts of token ids are bounded by the context); decoding this many
# values with the pure-Python scanner takes about half a second of one thread.
MAX_JSON_VALUES = 2**19
# Messages, content parts, prompts and schemas of any real request are far fewer.
MAX_JSON_CONTAINERS = 2**16

# Shared by every event loop of the process (tests run several servers), hence an executor.
_executor = concurrent.futures.ThreadPoolExecutor(OFF_LOOP_THREADS, thread_name_prefix="quiver-off-loop")


class JSONTooLarge(ValueError):
    """The document holds more than MAX_JSON_VALUES values or MAX_JSON_CONTAINERS arrays and objects."""


def is_large(body: bytes) -> bool:
    return len(body) >= OFF_LOOP_BYTES


async def run_off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on one of the worker threads (in a copy of this context); what it raises is raised here."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_executor, call)


def loads(body: bytes | str, **options: Any) -> Any:
    """`json.loads(body, **options)`, without holding the GIL for long on bodies of very many values.

    Raises JSONTooLarge past MAX_JSON_VALUES values, and what json.loads raises otherwise.
    """
    if _value_bound(body) <= _C_DECODER_MAX_VALUES:
        return json.loads(body, **options)
    # Decoded as json.loads decodes bytes, so both paths accept and refuse the same documents.
    text = body.decode(json.detect_encoding(body), "surrogatepass") if isinstance(body, bytes) else body
    return _BoundedDecoder(**options).decode(text)


def _value_bound(body: bytes | str) -> int:
    """More than the number of values in the document (separators in strings count too)."""
    if isinstance(body, bytes):
        return body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    return body.count(",") + body.count("[") + body.count("{") + 1


class _BoundedDecoder(json.JSONDecoder):
    """The pure-Python scanner, counting the values of arrays and objects as it goes."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._values = MAX_JSON_VALUES
        self._containers = MAX_JSON_CONTAINERS
        self.parse_array = self._parse_array
        self.parse_object = self._parse_object
        self.scan_once = json.scanner.py_make_scanner(self)

    def _counted(self, scan_once: Callable[[str, int], tuple[Any, int]]) -> Callable[[str, int], tuple[Any, int]]:
        def counted(string: str, index: int) -> tuple[Any, int]:
            self._values -= 1
            if self._values < 0:
                raise JSONTooLarge(f"the body holds more than {MAX_JSON_VALUES} JSON values")
            return scan_once(string, index)

        return counted

    def _container(self) -> None:
        self._containers -= 1
        if self._containers < 0:
            raise JSONTooLarge(f"the body holds more than {MAX_JSON_CONTAINERS} JSON arrays and objects")

    def _parse_array(self, s_and_end: tuple[str, int], scan_once: Any) -> tuple[list[Any], int]:
        self._container()
        return json.decoder.JSONArray(s_and_end, self._counted(scan_once))  # type: ignore[attr-defined]

    def _parse_object(self, s_and_end: tuple[str, int], strict: bool, scan_once: Any, object_hook: Any,
                      object_pairs_hook: Any, memo: Any = None) -> tuple[dict[str, Any], int]:
        self._container()
        return json.decoder.JSONObject(  # type: ignore[attr-defined]
            s_and_end, strict, self._counted(scan_once), object_hook, object_pairs_hook, memo)
