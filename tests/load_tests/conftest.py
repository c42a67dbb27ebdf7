"""A tiny model with a few synthetic adapters, served in this process on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from load_tests.local_server import InProcessServer
from load_tests.synthetic_adapters import write_adapters

MODEL_NAME = "tiny-base"
NUM_ADAPTERS = 4


@pytest.fixture(scope="session")
def load_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def load_adapters(load_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_adapters(load_model_dir, tmp_path_factory.mktemp("load-adapters"), NUM_ADAPTERS, rank=4,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def start_tiny_server(load_model_dir: Path, load_adapters: dict[str, Path]) -> Iterator[Callable[..., InProcessServer]]:
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    started: list[InProcessServer] = []

    def start(engine_kwargs: dict[str, Any] | None = None, **overrides: Any) -> InProcessServer:
        values: dict[str, Any] = dict(model=str(load_model_dir), device="cpu", dtype="float32", max_model_len=256,
                                      max_num_seqs=32, max_loras=2, max_lora_rank=8)
        values.update(overrides)
        engine = AsyncEngine(EngineConfig(**values), adapters=load_adapters, served_model_name=MODEL_NAME,
                             **(engine_kwargs or {}))
        server = InProcessServer(engine).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(start_tiny_server: Callable[..., InProcessServer]) -> InProcessServer:
    return start_tiny_server()
