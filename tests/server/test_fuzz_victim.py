"""Hostile numbers and strings in every route while a greedy stream runs beside them.

While hypothesis sends out-of-range and wrongly typed numbers (2**63, 2**64, negatives, floats,
NaN and infinities, bools, numbers as strings, 5000-digit literals) and hostile strings (long,
surrogates, control characters, nested JSON) into every field, a "victim" streams the same greedy
chat request again and again on the same server. No fuzzed response may be a 5xx (or a 200 stream
that fails), every 4xx is the error envelope, and every victim run ends normally with the text the
request gave alone. The sampling fields of the generation routes get targeted strategies; every
other route gets schemathesis' cases with hostile values put into their bodies, queries and paths.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer  # noqa: E402
from tests.server.fuzzing import MODES, NEGATIVE, Known, assert_not_a_server_error, cases  # noqa: E402

TARGETED_EXAMPLES = 160
ROUTE_EXAMPLES = 120
VICTIM = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
          "ignore_eos": True, "stream": True}
CHAT_ROUTES = ["/v1/chat/completions", "/v1/inference/chat/completions"]


class Raw(str):
    """JSON text that goes into the body as it is (what `json.dumps` cannot or will not write)."""


# ------------------------------------------------------------------ hostile values
# Values a field's validation must refuse (or, at a limit, take and survive).
HUGE = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 2**128, -(2**31) - 1,
        -(2**63), -(2**63) - 1, -(2**64), -1, 0, 1]
NUMBER_STRINGS = ["1", "2", "NaN", "nan", "Infinity", "-inf", "1e999", "9223372036854775808", "0x10", "1_000",
                  "", " 1", "\uff11", "1.0", "true", "null"]
numbers = st.one_of(
    st.sampled_from(HUGE), st.integers(), st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5, 1.5, 1e-300, 2.0000000001]),
    st.booleans(), st.none(), st.sampled_from(NUMBER_STRINGS),
)
def repeated(piece: str, times: int) -> st.SearchStrategy[str]:
    """`piece * times`, built when drawn (hypothesis never prints it in full)."""
    return st.builds(lambda: piece * times)


HOSTILE_STRINGS = ["\x00", "\x1b[31mred", "\u202eevil", "\ufeff", "\r\n\r\ndata: [DONE]\n\n", "../../etc/passwd",
                   "%s%n{0}", "\\u0000", "ft-x:ckpt-1", MODEL_NAME, " " * 10, "\u0085\u2028"]
strings = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_STRINGS),
                    st.text(st.characters(max_codepoint=0x1F), max_size=20),
                    repeated("a", 100_000), repeated("\U0001f3f9", 1000), repeated('{"a": ', 200),
                    repeated("[", 5000))
scalars = st.one_of(numbers, strings)
hostile = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
# Values no field sees: the body's decoding refuses them (5000-digit integers, NaN and the
# infinities, numbers past a double, lone surrogates, nesting 100,000 deep).
BODY_BREAKERS = [Raw("1e999"), Raw("-1e999"), Raw("1E400"), Raw("NaN"), Raw("-Infinity"), Raw("Infinity"),
                 "\ud800", "a\udfffb"]
breakers = st.one_of(
    st.sampled_from(BODY_BREAKERS), st.floats().filter(lambda x: x != x or abs(x) == float("inf")),
    st.builds(lambda: Raw("1" + "0" * 5000)), st.builds(lambda: Raw("-" + "9" * 4301)),
    st.builds(lambda: Raw("[" * 100_000 + "]" * 100_000)), st.builds(lambda: Raw('{"a":' * 20_000 + "1" + "}" * 20_000)))
# Parsed fine, odd all the same.
ODD_RAW = [Raw("-0"), Raw("1e-400"), Raw("123456789012345678901234567890.5"), Raw("1.0e0"), Raw("2E0")]


def encode(value: Any, ascii_only: bool = True) -> str:
    """JSON text of `value`, NaN and infinities as their literals and `Raw` parts as they are."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode(str(k), ascii_only)}:{encode(v, ascii_only)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def body_bytes(value: Any, raw_text: bool) -> bytes:
    """The body as UTF-8: non-ASCII text as `\\u` escapes, or (`raw_text`) as the bytes themselves,
    surrogates too (which UTF-8 forbids)."""
    return encode(value, ascii_only=not raw_text).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------ targeted generation bodies
# Values at the limits that pass validation and reach the engine, per field.
EDGES: dict[str, list[Any]] = {
    "top_k": [-1, 0, 1, 2**31 - 1], "top_p": [5e-324, 1e-9, 1, 1.0], "seed": [-(2**63), 2**63 - 1 - 128, 0, 7],
    "n": [1, 2, 128], "max_tokens": [1, 2], "temperature": [0, 2, 2.0, 1e-300],
    "presence_penalty": [-2, 2.0], "frequency_penalty": [-2.0, 2], "repetition_penalty": [1e-300, 10, 0.5],
    "min_tokens": [0, 1, 2], "stream": [True, False], "ignore_eos": [True],
    "stop_token_ids": [[0], [1, 2], [5] * 1024], "stop": [" ", ["a", "b", "c", "d"], "s" * 1024],
    "logit_bias": [{"0": 100}, {"1": -100, "2": 100.0}, {"3": -100.0}],
    "stream_options": [{"include_usage": True}], "user": ["u"],
}
CHAT_EDGES = {**EDGES, "logprobs": [True, False], "top_logprobs": [0, 20], "max_completion_tokens": [1, 2],
              "response_format": [{"type": "json_object"}, {"type": "text"}]}
COMPLETION_EDGES = {**EDGES, "logprobs": [0, 5], "echo": [True, False], "best_of": [1], "max_tokens": [0, 1, 2]}
BIAS_KEYS = ["0", "1", "-1", "\uff11", "1e3", " 2", "99999999999999999999", "1" * 5000, "0x1", "NaN", "1.5"]
# Wrong in some way each.
BAD: dict[str, st.SearchStrategy[Any]] = {
    "logit_bias": st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(BIAS_KEYS), st.text(max_size=6)),
                        st.one_of(numbers, st.floats(-1000, 1000)), min_size=1, max_size=5),
        st.builds(lambda: {str(i): -100 for i in range(2000)}), hostile),
    "stop": st.one_of(st.lists(strings, min_size=5, max_size=6), repeated("s", 1025), repeated("s", 1025).map(lambda x: [x]),
                      st.lists(numbers, min_size=1, max_size=2), numbers),
    "stop_token_ids": st.one_of(st.lists(st.sampled_from(HUGE), min_size=1, max_size=3),
                                st.builds(lambda: list(range(1025))), st.lists(numbers, min_size=1, max_size=2)),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": numbers}), hostile),
    "response_format": st.one_of(st.just({"type": "json_schema"}), st.fixed_dictionaries({"type": strings}),
                                 st.just({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}}),
                                 hostile),
}
MODELS = [MODEL_NAME, *ADAPTER_NAMES[:4]]
# The fuzzed server's context is 24 tokens: one short message, and room to generate.
valid_messages = st.sampled_from(["Hi", "a b", "\u4e2d", ""]).map(lambda text: [{"role": "user", "content": text}])
bad_messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "tool", "bot"]), strings),
                                    "content": st.one_of(strings, st.lists(st.fixed_dictionaries(
                                        {"type": st.just("text"), "text": strings}), max_size=3), hostile)}),
             min_size=1, max_size=3),
    st.builds(lambda: [{"role": "user", "content": "a"}] * 3000), st.just([]), hostile)
valid_prompt = st.one_of(st.sampled_from(["Hi", "a b c"]), st.lists(st.integers(0, 50), min_size=1, max_size=4),
                         st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=3), min_size=1, max_size=3))
bad_prompt = st.one_of(strings, st.lists(st.one_of(st.sampled_from(HUGE), st.integers()), min_size=1, max_size=4),
                       st.lists(st.lists(st.sampled_from(HUGE), max_size=3), max_size=3), st.builds(lambda: [[1]] * 3000),
                       st.just([]), st.just([[]]), hostile)


@st.composite
def generation_requests(draw: Callable[[Any], Any]) -> tuple[str, dict[str, Any]]:
    """A small valid chat or completions body with a few fields at their limits, then (mostly) one
    field made wrong: a huge, negative, fractional or wrongly typed number, a hostile string, or a
    value the body's decoding refuses."""
    chat = draw(st.booleans())
    edges = CHAT_EDGES if chat else COMPLETION_EDGES
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS)), "max_tokens": 2}
    body.update({"messages": draw(valid_messages)} if chat else {"prompt": draw(valid_prompt)})
    for name in draw(st.lists(st.sampled_from(sorted(edges)), unique=True, max_size=5)):
        body[name] = draw(st.sampled_from(edges[name]))
    if chat and body.get("top_logprobs") is not None:
        body["logprobs"] = True
    if "stream_options" in body:
        body["stream"] = True
    fields = ["model", "messages" if chat else "prompt", *sorted(edges)]
    how = draw(st.sampled_from(["valid", "bad", "bad", "bad", "odd number", "breaker"]))
    name = draw(st.sampled_from(fields))
    if how == "bad":
        special = {"messages": bad_messages, "prompt": bad_prompt, **BAD}.get(name)
        body[name] = draw(st.one_of(numbers, strings, hostile if special is None else special))
    elif how == "odd number":
        body[name] = draw(st.sampled_from(ODD_RAW))
    elif how == "breaker":
        body[name] = draw(breakers)
    return (draw(st.sampled_from(CHAT_ROUTES)) if chat else "/v1/completions"), body


# ------------------------------------------------------------------ the victim
@dataclass
class VictimRun:
    began: float
    ended: float = 0.0
    status: int = 0
    text: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    done: bool = False
    failure: str | None = None

    def outcome(self) -> tuple[Any, ...]:
        return self.status, self.text, self.errors, self.done, self.failure


def stream_victim(http: httpx.Client) -> VictimRun:
    run = VictimRun(began=time.monotonic())
    try:
        with http.stream("POST", "/v1/chat/completions", json=VICTIM) as response:
            run.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    run.done = True
                    continue
                event = json.loads(payload)
                if "error" in event:
                    run.errors.append(event["error"])
                for choice in event.get("choices", []):
                    run.text += choice["delta"].get("content") or ""
                    if choice.get("finish_reason"):
                        run.finish_reasons.append(choice["finish_reason"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        run.failure = repr(exc)
    run.ended = time.monotonic()
    return run


class Victim:
    """Streams the victim request over and over on a thread until stopped."""

    def __init__(self, live: LiveServer) -> None:
        self._live = live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.runs: list[VictimRun] = []

    def _loop(self) -> None:
        with self._live.http() as http:
            while not self._stop.is_set():
                self.runs.append(stream_victim(http))

    def __enter__(self) -> Victim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the victim stream did not end within 60 s"


@dataclass
class FuzzLog:
    """The fuzzed requests with when they were in flight, to name those beside a failed victim run."""

    sent: deque[tuple[float, float, str]] = field(default_factory=lambda: deque(maxlen=2000))

    def overlapping(self, run: VictimRun) -> list[str]:
        return [what for began, ended, what in self.sent if began <= run.ended and ended >= run.began]


@pytest.fixture(scope="module")
def alone(fuzz_live: LiveServer) -> VictimRun:
    """The victim request run with nothing beside it."""
    with fuzz_live.http() as http:
        run = stream_victim(http)
    assert run.status == 200 and run.done and not run.errors and run.failure is None, run
    assert run.finish_reasons in (["stop"], ["length"]) and run.text, run
    return run


@pytest.fixture
def victim(fuzz_live: LiveServer, alone: VictimRun) -> Iterator[tuple[Victim, FuzzLog]]:
    log = FuzzLog()
    with Victim(fuzz_live) as running:
        yield running, log
    runs = running.runs
    assert len(runs) >= 2, "the victim did not run beside the fuzz"
    for run in runs:
        assert run.outcome() == alone.outcome() and run.finish_reasons in (["stop"], ["length"]), (
            run, alone, log.overlapping(run)[-20:])


def _send(http: httpx.Client, log: FuzzLog, method: str, url: str, **kwargs: Any) -> httpx.Response:
    began = time.monotonic()
    response = http.request(method, url, **kwargs)
    what = f"{method} {url} {kwargs.get('params')!r} {kwargs.get('content', kwargs.get('json'))!r}"[:400]
    log.sent.append((began, time.monotonic(), what))
    return response


def assert_fine(response: httpx.Response, request: object) -> None:
    """Not a server error; a 200 stream carries no error event either."""
    assert_not_a_server_error(response.status_code, response.text, request)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                assert "error" not in json.loads(line[5:]), (request, line)


def _fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_hostile_sampling_fields_never_fail_the_server_or_a_concurrent_stream(
        fuzz_live: LiveServer, victim: tuple[Victim, FuzzLog]) -> None:
    _, log = victim
    with fuzz_live.http() as http:

        @_fuzz_settings(TARGETED_EXAMPLES)
        @given(request=generation_requests(), raw_text=st.booleans())
        def check(request: tuple[str, dict[str, Any]], raw_text: bool) -> None:
            path, body = request
            response = _send(http, log, "POST", path, content=body_bytes(body, raw_text),
                             headers={"content-type": "application/json"})
            assert_fine(response, request)

        check()


# ------------------------------------------------------------------ every route
def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Where a value could be replaced: every key and index, nested ones too."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield (*prefix, key)
        yield from _paths(inner, (*prefix, key))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else encode(value)


@st.composite
def route_requests(draw: Callable[[Any], Any], operations: dict[str, Any], known: Known) -> tuple[Any, bool]:
    """A schemathesis case of any operation; a valid one gets hostile values in place of some of its own."""
    label = draw(st.sampled_from(sorted(operations)))
    mode = draw(st.sampled_from(MODES[label]))
    case = draw(cases(operations[label], mode, known))
    if mode is NEGATIVE:
        return case, False
    json_body = isinstance(case.body, dict) and case.media_type == "application/json"
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["body", "query", "path"]))
        if where == "body" and isinstance(case.body, dict) and (spots := list(_paths(case.body))):
            new = draw(st.one_of(hostile, hostile, st.sampled_from(ODD_RAW), breakers))
            _replace(case.body, draw(st.sampled_from(spots)), new if json_body else _as_text(new))
        elif where == "query" and case.query:
            case.query[draw(st.sampled_from(sorted(case.query)))] = _as_text(draw(scalars))
        elif where == "path" and case.path_parameters:
            text = _as_text(draw(scalars))
            case.path_parameters[draw(st.sampled_from(sorted(case.path_parameters)))] = text or "x"
    return case, json_body


def _safe_text(value: Any) -> Any:
    """Multipart and URL parts must be encodable: surrogates go as replacement characters."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {k: _safe_text(v) for k, v in value.items()}
    return value


def test_hostile_values_in_every_route_never_fail_the_server_or_a_concurrent_stream(
        fuzz_live: LiveServer, operations: dict[str, Any], known: Known, victim: tuple[Victim, FuzzLog]) -> None:
    _, log = victim
    with fuzz_live.http() as http:

        @_fuzz_settings(ROUTE_EXAMPLES)
        @given(request=route_requests(operations, known), raw_text=st.booleans())
        def check(request: tuple[Any, bool], raw_text: bool) -> None:
            case, json_body = request
            case.query = _safe_text(case.query)
            case.path_parameters = _safe_text(case.path_parameters)
            described = (case.operation.label, case.path_parameters, case.query, case.body)
            if json_body:
                response = _send(http, log, case.method, case.formatted_path, params=case.query,
                                 content=body_bytes(case.body, raw_text),
                                 headers={"content-type": "application/json"})
                assert_fine(response, described)
                return
            if isinstance(case.body, dict):
                case.body = _safe_text(case.body)
            began = time.monotonic()
            called = case.call(base_url=fuzz_live.base_url, timeout=30)
            log.sent.append((began, time.monotonic(), repr(described)[:400]))
            assert_not_a_server_error(called.status_code, called.text, described)

        check()
