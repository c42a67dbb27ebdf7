"""A fast in-process engine for the server's shape and error tests: the `EngineClient` the server
calls (server/state.py), with no weights and no engine thread.

It generates: each model answers a fixed sentence (an adapter's starts with its name in brackets,
so a test sees which model answered; `answers` sets another text per model), one token per delta, through the engine's own incremental
detokenizer (stop strings and held-back text behave as the real engine's), then the EOS token
(`finish_reason` "stop"), or "length" at `max_tokens` or the end of the context. Logprobs are
made up but well formed (the chosen token first among its alternatives, sorted, all below 0).

Errors on demand: `refuse_with` (raised before any delta, as the engine refuses an overload or an
unknown adapter), `fail_after` (an "error" delta after that many tokens, as a failed step),
more requests in flight than `max_num_seqs + max_waiting` (EngineOverloadedError), an adapter whose source is in `broken`
(AdapterFailedError), and `gate` (cleared: every stream waits before its next delta, so a test can
hold requests in flight). What each request asked for is kept in `requests`; aborted ids in `aborted`.

The adapter registry behaves as the real one with no adapter root for the journal and deployments:
names and sources checked, pins (`slots - 1` at most), failures.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adapters.registry import AdapterExistsError, PinLimitError
from adapters.sources import source_from_request, validate_name
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import AdapterFailedError, EngineOverloadedError, UnknownAdapterError
from engine.outputs import RequestDelta, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.token_text import TokenText
from tests.factories import build_tokenizer

MODEL_NAME = "tiny-base"
BASE_ANSWER = "The quick brown fox jumps over the lazy dog."
ADAPTER_ANSWER = "Quiver serves many LoRA adapters from one base model."
CHOSEN_LOGPROB = -0.25


def answer_of(adapter: str | None) -> str:
    """The text a model answers with before its EOS."""
    return BASE_ANSWER if adapter is None else f"[{adapter}] {ADAPTER_ANSWER}"


@dataclass
class FakeRequest:
    """What one `generate` call asked for."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    grammar: str | None  # the grammar text the server passed (a structured or forced-call request)


class FakeEngine:
    model_name = MODEL_NAME

    def __init__(self, adapters: dict[str, str] | None = None, *, slots: int = 3,
                 broken: frozenset[str] = frozenset(), max_model_len: int = 256, max_num_seqs: int = 32,
                 max_waiting: int = 32) -> None:
        self.slots = slots
        self.broken = broken  # sources that fail to load
        self.infos: dict[str, dict[str, Any]] = {}
        for name, source in (adapters or {}).items():
            self._add(name, source)
        self.tokenizer = build_tokenizer()  # the tiny test models' tokenizer and ChatML template
        self.max_model_len = max_model_len
        self.eos_token_ids = {self.tokenizer.eos_token_id}
        # What the server reads of the engine's configuration: the model (no weights on disk) and the queue.
        self.config = SimpleNamespace(model=f"/models/{MODEL_NAME}", max_num_seqs=max_num_seqs,
                                      max_waiting=max_waiting)
        self.died: str | None = None  # set: the engine thread is dead, and /health says why
        self.refuse_with: BaseException | None = None
        self.fail_after: int | None = None
        self.fail_message = "the device fell over"
        self.gate = threading.Event()
        self.gate.set()
        self.answers: dict[str | None, str] = {}  # model (None: the base) -> what it answers instead
        self.requests: list[FakeRequest] = []
        self.aborted: list[str] = []
        self.started = False
        self._streams: dict[str, str | None] = {}  # request id -> adapter, while it generates
        self._text = TokenText(self.tokenizer)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    @property
    def failure(self) -> str | None:
        return self.died

    # ---------------------------------------------------------------- requests
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: str | None = None, grammar: str | None = None,
                       ) -> AsyncIterator[RequestDelta]:
        """Yield deltas until the one with a finish_reason; closing early aborts the request."""
        self.requests.append(FakeRequest(request_id, list(prompt_token_ids), params, adapter, grammar))
        if self.refuse_with is not None:
            raise self.refuse_with
        if len(self._streams) >= self.config.max_num_seqs + self.config.max_waiting:
            raise EngineOverloadedError(f"the server is at capacity ({len(self._streams)} requests in flight)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter is not None:
            info = self._get(adapter)
            if info["state"] == "failed":
                raise AdapterFailedError(adapter, info["error"])
        self._streams[request_id] = adapter
        finished = False
        try:
            async for delta in self._deltas(request_id, list(prompt_token_ids), params, adapter):
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def _deltas(self, request_id: str, prompt: list[int], params: SamplingParams,
                      adapter: str | None) -> AsyncIterator[RequestDelta]:
        prompt_scores = _prompt_logprobs(prompt, params.prompt_logprobs, self._vocab)
        if params.max_tokens == 0:  # the prompt only is scored
            yield RequestDelta(request_id, finish_reason="length", num_prompt_tokens=len(prompt),
                               prompt_logprobs=prompt_scores)
            return
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params.stop)
        text = self.answers.get(adapter, answer_of(adapter))
        answer = list(self.tokenizer.encode(text, add_special_tokens=False))
        terminal = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        eos = min(self.eos_token_ids)
        produced = 0
        while True:
            await self._paced()
            if self.fail_after is not None and produced >= self.fail_after:
                yield RequestDelta(request_id, finish_reason="error", error=self.fail_message,
                                   num_prompt_tokens=len(prompt), num_output_tokens=produced)
                return
            position = produced % (len(answer) + 1)
            token = answer[position] if position < len(answer) else eos
            if token == eos and (params.ignore_eos or produced < params.min_tokens):
                token = answer[0]  # the answer again instead of the EOS
            produced += 1
            finish, text = None, ""
            if token in terminal:
                finish = "stop"
            else:
                text = detokenizer.add(token)
                if detokenizer.stopped:
                    finish = "stop"
                elif produced >= params.max_tokens or len(prompt) + produced >= self.max_model_len:
                    finish = "length"
            if finish is not None:
                text += detokenizer.flush()
            logprobs = [] if params.top_logprobs is None else [_logprob(token, params.top_logprobs, self._vocab)]
            yield RequestDelta(request_id, token_ids=[token], text=text, logprobs=logprobs, finish_reason=finish,
                               num_prompt_tokens=len(prompt), num_output_tokens=produced,
                               queue_time=0.0 if produced == 1 else None,
                               prompt_logprobs=prompt_scores if produced == 1 else None)
            if finish is not None:
                return

    async def _paced(self) -> None:
        """One step: let the event loop run, and wait while the gate is closed."""
        await asyncio.sleep(0)
        while not self.gate.is_set():
            await asyncio.sleep(0.005)

    @property
    def _vocab(self) -> int:
        return len(self.tokenizer)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def engine_state(self) -> dict[str, Any]:
        raise RuntimeError("the fake engine has no engine core to read")

    def stats(self) -> dict[str, int]:
        return {"num_streams": len(self._streams), "num_requests": len(self._streams),
                "num_running": len(self._streams), "num_waiting": 0}

    def token_bytes(self, token_id: int) -> bytes:
        return self._text.token_bytes(token_id)

    def token_str(self, token_id: int) -> str:
        return self._text.token_str(token_id)

    # ---------------------------------------------------------------- adapters
    def _add(self, name: str, source: str) -> dict[str, Any]:
        validate_name(name)
        if name in self.infos:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")
        failed = source in self.broken
        info = {"id": name, "object": "adapter", "source": source, "state": "failed" if failed else "host",
                "pinned": False, "size_bytes": None if failed else 4096,
                "error": f"cannot load {source}" if failed else None}
        self.infos[name] = info
        if failed:
            raise AdapterFailedError(name, info["error"])
        return dict(info)

    def has_adapter(self, name: str) -> bool:
        return name in self.infos

    def is_registered(self, name: str) -> bool:
        return name in self.infos

    async def find_adapter(self, name: str) -> bool:
        return name in self.infos

    def adapter_names(self) -> list[str]:
        return list(self.infos)

    def pinned(self) -> set[str]:
        return {name for name, info in self.infos.items() if info["pinned"]}

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.infos:
            raise UnknownAdapterError(name)
        return self.infos[name]

    async def register_adapter(self, name: str, source: str) -> dict[str, Any]:
        """A client's source, checked as the real engine checks it (no adapter root: hub sources only)."""
        validate_name(name)
        source_from_request(source, None)
        return self._add(name, source)

    async def add_adapter(self, name: str, path: Path | str) -> int:
        self._add(name, str(path))
        return len(self.infos)

    async def adapter_info(self, name: str) -> dict[str, Any]:
        return dict(self._get(name))

    async def list_adapters(self) -> list[dict[str, Any]]:
        return [dict(info) for info in self.infos.values()]

    async def promote_adapter(self, name: str) -> dict[str, Any]:
        info = self._get(name)
        if info["state"] == "failed":
            raise AdapterFailedError(name, info["error"])
        if not info["pinned"] and len(self.pinned()) + 1 > self.slots - 1:
            raise PinLimitError(f"cannot promote {name!r}: one slot must stay free")
        info.update(pinned=True, state="pinned")
        return dict(info)

    async def demote_adapter(self, name: str) -> dict[str, Any]:
        info = self._get(name)
        info.update(pinned=False, state="host")
        return dict(info)

    async def delete_adapter(self, name: str) -> dict[str, Any]:
        self._get(name)
        in_flight = sum(1 for adapter in self._streams.values() if adapter == name)
        del self.infos[name]
        return {"id": name, "object": "adapter", "deleted": True, "in_flight": in_flight}


def _alternatives(token: int, count: int, vocab: int) -> list[tuple[int, float]]:
    """The chosen token first, then the next ids, each less likely than the one before."""
    return [((token + i) % vocab, CHOSEN_LOGPROB - i) for i in range(count)]


def _logprob(token: int, top: int, vocab: int) -> TokenLogprob:
    return TokenLogprob(token, CHOSEN_LOGPROB, _alternatives(token, top, vocab))


def _prompt_logprobs(prompt: list[int], top: int | None, vocab: int) -> list[TokenLogprob | None] | None:
    if top is None:
        return None
    return [None] + [TokenLogprob(t, CHOSEN_LOGPROB, _alternatives(t, top, vocab), rank=1) for t in prompt[1:]]
