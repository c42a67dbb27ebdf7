"""The generation pipeline (server/openai/pipeline.py) over the fake engine: a run starts every choice
and settles the response status before anything is rendered (the engine's refusals become statuses),
collecting merges each choice whole, a failed step is a 500, a client that left gets nothing and its
requests are aborted, and large bodies are prepared off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from starlette.requests import Request

from engine.errors import EngineOverloadedError
from engine.sampling_params import SamplingParams
from server.http.errors import APIError
from server.http.off_loop import OFF_LOOP_BYTES
from server.openai import pipeline
from server.openai.generation import ChoiceRequest, ClientDisconnected
from server.state import ServerState
from tests.server.fake_engine import FakeEngine, answer_of

T = TypeVar("T")
PROMPT = [5, 6, 7]


def _request(body: bytes = b"{}", *, client_leaves: bool = False) -> Request:
    """A request whose body is `body`; its client leaves at once, or stays for good."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if client_leaves:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def _served(engine: FakeEngine, work: Callable[[ServerState], Awaitable[T]]) -> T:
    """`work(state)` on a started app state serving `engine`."""

    async def run() -> T:
        state = ServerState(engine)

        async def no_ready_steps(engine: Any) -> None:
            pass

        await state.start_engine(no_ready_steps)
        return await work(state)

    return asyncio.run(run())


def _choices(*adapters: str | None, **params: Any) -> list[ChoiceRequest]:
    return [ChoiceRequest(i, f"req-{i}", list(PROMPT), SamplingParams(**{"max_tokens": 200, **params}), adapter)
            for i, adapter in enumerate(adapters)]


async def _collected(state: ServerState, choices: list[ChoiceRequest], request: Request | None = None,
                     ) -> list[Any] | None:
    request = request or _request()
    meta = pipeline.new_meta("id", "m", state.engine, [c.params for c in choices], len(PROMPT))
    started = await pipeline.run(request, state, choices, meta, stream=False)
    return await pipeline.collect(request, started)


def test_a_collected_run_holds_every_choice_whole_with_its_finish_reason() -> None:
    engine = FakeEngine({"bows": "/adapters/bows"})
    states = _served(engine, lambda state: _collected(state, _choices(None, "bows")))
    assert states is not None and [s.index for s in states] == [0, 1]
    assert [s.text for s in states] == [answer_of(None), answer_of("bows")]
    assert [s.finish_reason for s in states] == ["stop", "stop"]
    assert all(s.token_ids[-1] in engine.eos_token_ids for s in states)
    assert {r.adapter for r in engine.requests} == {None, "bows"} and engine.aborted == []


def test_an_engine_refusal_before_any_delta_becomes_the_response_status() -> None:
    engine = FakeEngine()
    engine.refuse_with = EngineOverloadedError("the server is at capacity")
    with pytest.raises(APIError) as refused:
        _served(engine, lambda state: _collected(state, _choices(None)))
    assert refused.value.status == 429 and refused.value.code == "overloaded"


def test_a_step_that_fails_while_collecting_is_a_500_naming_the_engine_error() -> None:
    engine = FakeEngine()
    engine.fail_after = 3
    with pytest.raises(APIError) as failed:
        _served(engine, lambda state: _collected(state, _choices(None, None)))
    assert failed.value.status == 500 and failed.value.code == "engine_error"
    assert engine.fail_message in failed.value.message


def test_a_client_that_leaves_before_the_first_token_aborts_every_choice() -> None:
    engine = FakeEngine()
    engine.gate.clear()  # nothing is generated: the client leaves first
    with pytest.raises(ClientDisconnected):
        _served(engine, lambda state: _collected(state, _choices(None, None), _request(client_leaves=True)))
    assert set(engine.aborted) == {"req-0", "req-1"} and engine.stats()["num_streams"] == 0  # abort is idempotent


def test_terminal_ids_are_the_eos_and_stop_token_ids_unless_eos_is_ignored() -> None:
    engine = FakeEngine()
    assert pipeline.terminal_ids(engine, SamplingParams(stop_token_ids=[7])) == engine.eos_token_ids | {7}
    assert pipeline.terminal_ids(engine, SamplingParams(stop_token_ids=[7], ignore_eos=True)) == {7}


def test_a_response_format_becomes_checked_grammar_text_and_free_text_none() -> None:
    from engine.grammar import Grammars
    from server.openai.schemas import ResponseFormat

    engine = FakeEngine()
    assert _served(engine, lambda state: pipeline.format_grammar(state, engine, None)) is None
    wanted = ResponseFormat.model_validate({"type": "json_schema",
                                            "json_schema": {"name": "x", "schema": {"enum": ["yes", "no"]}}})
    grammar = _served(engine, lambda state: pipeline.format_grammar(state, engine, wanted))
    assert isinstance(grammar, str)
    processor = Grammars(engine.tokenizer).processor(grammar)  # what the engine makes of it
    first = engine.tokenizer.encode('"', add_special_tokens=False)[0]
    assert processor.allowed_mask()[first] and processor.allowed_mask().sum() < len(engine.tokenizer) // 2


@pytest.mark.parametrize(("size", "off_loop"), [(10, False), (OFF_LOOP_BYTES, True)])
def test_large_bodies_are_prepared_off_the_event_loop(size: int, off_loop: bool) -> None:
    loop_thread = threading.get_ident()

    def prepare(tag: str) -> tuple[str, bool]:
        return tag, threading.get_ident() != loop_thread

    async def run() -> tuple[str, bool]:
        return await pipeline.prepared(_request(b" " * size), prepare, "planned")

    assert asyncio.run(run()) == ("planned", off_loop)
