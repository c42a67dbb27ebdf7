"""One host load: fetch an adapter's files, validate them against the base model, fold the weights.

Runs on a loader thread (it reads disk or the network); the result is handed to the engine
thread, which alone changes what is resident (engine/adapter_host.py, engine/adapter_slots.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.errors import AdapterConfigError, UnsupportedAdapterError
from adapters.peft_format import AdapterSpec, read_adapter_spec
from adapters.sources import AdapterSource, materialize
from adapters.weights import LoraWeights, load_adapter

logger = logging.getLogger(__name__)


class BaseModelMismatchError(AdapterConfigError):
    """`base_model_name_or_path` names another model and the server refuses such adapters."""


@dataclass(frozen=True)
class LoadPolicy:
    """What every adapter must agree with: the base model's modules, the slot rank, the base's names."""

    expected_shapes: dict[str, tuple[int, int]] | None
    num_layers: int | None
    max_rank: int
    dtype: torch.dtype = torch.float32
    base_names: frozenset[str] = frozenset()
    refuse_base_mismatch: bool = False
    allow_dora: bool = True  # False under tensor parallelism, where DoRA's scaling is not applied
    pin_memory: bool = False
    hub_cache_dir: Path | None = None
    # Held while pinning: page-locking memory is a CUDA call, which must not run while the
    # engine thread captures a CUDA graph (it would invalidate the capture).
    pin_lock: AbstractContextManager[Any] | None = None
    # Runs on the page-locked weights under `pin_lock`: the engine attaches its slot copy plan.
    prepare: Callable[[LoraWeights], None] | None = None


@dataclass
class LoadedAdapter:
    weights: LoraWeights
    path: Path
    warnings: list[str] = field(default_factory=list)


def load_from_source(
    name: str, source: AdapterSource, policy: LoadPolicy, path: Path | None = None
) -> LoadedAdapter:
    """Read and validate adapter `name`; `path` skips fetching when the files are already local."""
    path = path or materialize(name, source, policy.hub_cache_dir)
    spec = read_adapter_spec(path, name, source.root)
    if spec.use_dora and not policy.allow_dora:
        raise UnsupportedAdapterError(name, "DoRA adapters are not served with tensor parallelism yet")
    warnings = []
    mismatch = base_mismatch(spec, policy.base_names)
    if mismatch:
        if policy.refuse_base_mismatch:
            raise BaseModelMismatchError(name, mismatch + " (the server refuses such adapters)")
        logger.warning("adapter %r: %s", name, mismatch)
        warnings.append(mismatch)
    weights = load_adapter(
        path,
        name,
        expected_shapes=policy.expected_shapes,
        num_layers=policy.num_layers,
        max_rank=policy.max_rank,
        dtype=policy.dtype,
        root=source.root,
    )
    if policy.pin_memory:
        # Page-locked host copies make the copy into a GPU slot a fast DMA.
        with policy.pin_lock or contextlib.nullcontext():
            weights.modules = pin_all(weights.modules)
            if policy.prepare is not None:
                policy.prepare(weights)
    return LoadedAdapter(weights, path, warnings)


def pin_all(modules: dict[Any, tuple[torch.Tensor, torch.Tensor]],
            pin: bool = True) -> dict[Any, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The same tensors as views of one page-locked buffer: one host allocation per adapter, not
    one per tensor (a llama-8b adapter has 256; allocating each took ~0.65 s on an H100 host).
    `pin=False` gives the same layout in pageable memory (machines without a GPU)."""
    tensors = [t for pair in modules.values() for t in pair]
    if not tensors:
        return dict(modules)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        if not pin:
            return dict(modules)
        return {key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in modules.items()}
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtypes.pop(), pin_memory=pin)
    offset = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = flat[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        offset += t.numel()
        return view

    return {key: (place(a), place(b)) for key, (a, b) in modules.items()}


def base_names(*names: str | Path | None) -> frozenset[str]:
    """Every spelling of the served base model an adapter config may use, normalised.

    A hub cache snapshot path (`.../models--org--name/snapshots/<sha>`) also answers to `org/name`.
    """
    found: set[str] = set()
    for raw in names:
        if not raw:
            continue
        text = str(raw)
        found.add(_norm(text))
        for part in Path(text).parts:
            if part.startswith("models--"):
                found.add(_norm(part[len("models--"):].replace("--", "/")))
    return frozenset(found)


def base_mismatch(spec: AdapterSpec, names: frozenset[str]) -> str | None:
    """Why the adapter's base model is not the served one, or None when it is (or is unknown).

    Two names match when they are equal or end in the same component, so a local copy of
    `org/Model` matches an adapter trained on `org/Model`.
    """
    wanted = spec.base_model_name_or_path
    if not wanted or not names:
        return None
    norm = _norm(wanted)
    tails = {_tail(n) for n in names}
    if norm in names or _tail(norm) in tails:
        return None
    known = ", ".join(repr(n) for n in sorted(names, key=len)[:3])
    return f"base_model_name_or_path {wanted!r} names a different model than the served base ({known})"


def _norm(text: str) -> str:
    return text.strip().rstrip("/").lower()


def _tail(text: str) -> str:
    return text.rsplit("/", 1)[-1]
