from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers.utils import logging as transformers_logging

from tests.factories import build_adapter_dir, build_model_dir

torch.set_num_threads(min(2, torch.get_num_threads()))
transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (and cache per session) a tiny random model dir of an architecture."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (arch, seed, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"model-{arch}")
            cache[key] = build_model_dir(path, arch=arch, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_adapter_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (and cache per session) a tiny PEFT adapter for a model dir."""
    cache: dict[tuple, Path] = {}

    def make(model_dir: Path, **kwargs) -> Path:
        key = (str(model_dir), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp("adapter")
            cache[key] = build_adapter_dir(path, model_dir, **kwargs)
        return cache[key]

    return make
