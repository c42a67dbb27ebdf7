"""The fake engine stands in for the real one only while both keep the server's `EngineClient` protocol:
every member with the same parameters, async where the protocol's is. And it generates what the
shape tests rely on (the model's answer, EOS, length, stop strings, logprobs, errors on demand)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import EngineOverloadedError
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from server.state import EngineClient
from tests.server.fake_engine import BASE_ANSWER, FakeEngine, answer_of

_DATA = {"model_name", "tokenizer", "max_model_len", "eos_token_ids", "config"}


def _members() -> list[str]:
    return [name for name in vars(EngineClient) if not name.startswith("_")]


def _kind(member: Any) -> str:
    if isinstance(member, property):
        return "property"
    if inspect.isasyncgenfunction(member):
        return "async iterator"
    return "coroutine" if inspect.iscoroutinefunction(member) else "function"


def _parameters(member: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.default) for p in inspect.signature(member).parameters.values()]


@pytest.mark.parametrize("engine_class", [AsyncEngine, FakeEngine])
def test_both_engines_keep_the_protocol_the_server_calls(engine_class: type) -> None:
    members = _members()
    assert {"generate", "abort", "stats", "failure", "promote_adapter"} <= set(members)
    for name in members:
        wanted = getattr(EngineClient, name)
        if name in _DATA:
            continue  # instance data: checked on a built fake below
        assert hasattr(engine_class, name), f"{engine_class.__name__} has no {name}"
        found = getattr(engine_class, name)
        if isinstance(wanted, property):
            assert isinstance(found, property), f"{engine_class.__name__}.{name} is not a property"
            continue
        assert _parameters(found) == _parameters(wanted), f"{engine_class.__name__}.{name}"
        kinds = {_kind(found), _kind(wanted)}
        # `generate` is declared as returning an async iterator: an async generator function keeps it.
        assert len(kinds) == 1 or kinds == {"function", "async iterator"}, f"{engine_class.__name__}.{name}: {kinds}"


def test_the_fake_carries_the_protocols_data() -> None:
    engine = FakeEngine()
    for name in _DATA:
        assert getattr(engine, name) is not None, name
    assert engine.config.max_num_seqs > 0 and engine.failure is None


async def _run(engine: FakeEngine, params: SamplingParams, adapter: str | None = None,
               prompt: list[int] | None = None, request_id: str = "r") -> list[RequestDelta]:
    return [d async for d in engine.generate(request_id, prompt or [5, 6, 7], params, adapter=adapter)]


def test_each_model_answers_its_sentence_then_eos() -> None:
    engine = FakeEngine({"bows": "/adapters/bows"})
    for adapter in (None, "bows"):
        deltas = asyncio.run(_run(engine, SamplingParams(max_tokens=200), adapter))
        assert "".join(d.text for d in deltas) == answer_of(adapter)
        assert deltas[-1].finish_reason == "stop" and deltas[-1].token_ids[0] in engine.eos_token_ids
        assert [d.finished for d in deltas].count(True) == 1 and all(len(d.token_ids) == 1 for d in deltas)
    assert answer_of("bows").startswith("[bows] ")


def test_length_stop_strings_and_ignore_eos() -> None:
    engine = FakeEngine()
    short = asyncio.run(_run(engine, SamplingParams(max_tokens=3)))
    assert len(short) == 3 and short[-1].finish_reason == "length"
    cut = asyncio.run(_run(engine, SamplingParams(max_tokens=200, stop=["fox"])))
    assert "".join(d.text for d in cut) == BASE_ANSWER[:BASE_ANSWER.index("fox")] and cut[-1].finish_reason == "stop"
    long = asyncio.run(_run(engine, SamplingParams(max_tokens=200, ignore_eos=True)))
    assert len(long) == 200 and long[-1].finish_reason == "length"


def test_logprobs_are_well_formed_and_prompt_logprobs_come_first() -> None:
    engine = FakeEngine()
    deltas = asyncio.run(_run(engine, SamplingParams(max_tokens=4, top_logprobs=3, prompt_logprobs=2)))
    for delta in deltas:
        [entry] = delta.logprobs
        assert entry.top[0][0] == entry.token_id and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
    prompt = deltas[0].prompt_logprobs
    assert prompt is not None and prompt[0] is None and len(prompt) == 3
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_errors_on_demand() -> None:
    engine = FakeEngine()
    engine.fail_after = 2
    deltas = asyncio.run(_run(engine, SamplingParams(max_tokens=50)))
    assert len(deltas) == 3 and deltas[-1].finish_reason == "error" and deltas[-1].error == engine.fail_message
    engine.fail_after, engine.refuse_with = None, EngineOverloadedError("full")
    with pytest.raises(EngineOverloadedError):
        asyncio.run(_run(engine, SamplingParams()))
    assert [r.request_id for r in engine.requests] == ["r", "r"]


def test_a_stream_closed_early_is_aborted() -> None:
    engine = FakeEngine()

    async def first_only() -> None:
        stream = engine.generate("early", [1, 2], SamplingParams(max_tokens=50))
        await anext(stream)
        assert engine.stats()["num_streams"] == 1
        await stream.aclose()

    asyncio.run(first_only())
    assert engine.aborted == ["early"] and engine.stats()["num_streams"] == 0
