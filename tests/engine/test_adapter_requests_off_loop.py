"""A request for an adapter reads no file on the event loop: a known adapter is resolved from
memory, its weights are read by the loader pool; a directory copied into the adapter root while
the engine runs is looked for on a worker thread, and served on its first request."""

from __future__ import annotations

import asyncio
import builtins
import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.config import AdapterConfig
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import UnknownAdapterError
from engine.sampling_params import SamplingParams
from tests.adapters.lora_dirs import model_dims, one_torch_thread, write_lora_dir

MAX_NEW = 3
PROMPT = [5, 17, 42, 8]
# Every way pathlib, os.path and open reach the filesystem.
_FS_CALLS = ("stat", "lstat", "listdir", "scandir", "readlink", "open", "access")


class LoopFiles:
    """Records the filesystem calls made on one thread (the event loop's) while it is watching."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.thread: int | None = None
        self.calls: list[str] = []
        for name in _FS_CALLS:
            monkeypatch.setattr(os, name, self._wrap(f"os.{name}", getattr(os, name)))
        monkeypatch.setattr(builtins, "open", self._wrap("open", builtins.open))
        monkeypatch.setattr(io, "open", self._wrap("io.open", io.open))

    def _wrap(self, label: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self.thread:
                self.calls.append(f"{label}{args[:1]}")
            return real(*args, **kwargs)

        return call

    def watch(self) -> None:
        """From now on, record the calls of the thread this runs on."""
        self.thread = threading.get_ident()
        self.calls.clear()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def setup(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    model_dir = tiny_model_factory("llama")
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    dims = model_dims(model_dir)
    write_lora_dir(root / "in-root", dims, seed=1)
    write_lora_dir(elsewhere / "named", dims, seed=2)
    return model_dir, root, elsewhere, dims


def _engine(model_dir: Path, root: Path, elsewhere: Path) -> AsyncEngine:
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                          max_num_seqs=8, max_loras=2, max_lora_rank=16)
    return AsyncEngine(config, adapters={"named": elsewhere / "named"}, served_model_name="tiny",
                       adapter_config=AdapterConfig(adapter_root=root))


async def _complete(engine: AsyncEngine, rid: str, adapter: str | None) -> list[int]:
    tokens: list[int] = []
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    async for delta in engine.generate(rid, PROMPT, params, adapter):
        assert delta.finish_reason != "error", delta.error
        tokens += delta.token_ids
    return tokens


def test_requests_for_known_adapters_read_no_file_on_the_event_loop(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, root, elsewhere, _ = setup
    files = LoopFiles(monkeypatch)

    async def main() -> None:
        engine = _engine(model_dir, root, elsewhere)
        await engine.start()
        try:
            files.watch()
            for name in ("in-root", "named"):
                assert engine.has_adapter(name)  # what the server asks before generating
                first = await _complete(engine, f"{name}-1", name)  # loads from disk (the loader pool)
                again = await _complete(engine, f"{name}-2", name)  # from memory
                assert len(first) == MAX_NEW and again == first
                info = await engine.adapter_info(name)
                assert info["requests"] == 2 and info["in_flight"] == 0 and info["loads"] == 1
            await engine.list_adapters()
            assert files.calls == [], files.calls
            # The recorder does see the loop read files: what the synchronous check of a name that
            # is not registered costs, and what `find_adapter` and requests avoid.
            assert not engine.has_adapter("absent")
            assert files.calls, "the recorder missed a read on the event loop"
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_directory_copied_into_the_root_is_served_on_its_first_request_without_the_loop_reading_it(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, root, elsewhere, dims = setup
    files = LoopFiles(monkeypatch)

    async def main() -> None:
        engine = _engine(model_dir, root, elsewhere)
        await engine.start()
        try:
            files.watch()
            assert not await engine.find_adapter("late")
            write_lora_dir(root / "late", dims, seed=3)
            write_lora_dir(root / "later", dims, seed=4)
            files.watch()
            assert len(await _complete(engine, "late-1", "late")) == MAX_NEW, "served on its first request"
            assert await engine.find_adapter("later") and "later" in engine.adapter_names()
            with pytest.raises(UnknownAdapterError):
                await _complete(engine, "missing", "missing")
            assert files.calls == [], files.calls
            assert engine.adapter_refcounts()["late"] == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())
