"""An engine stand-in with the adapter registry's behaviour and none of its weights, for the tests of
what the server keeps across restarts (journal, deployments): fast, and its pins are plain to inspect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from adapters.registry import AdapterExistsError, PinLimitError
from adapters.sources import validate_name
from engine.errors import AdapterFailedError, UnknownAdapterError
from engine.outputs import RequestDelta


class FakeEngine:
    model_name = "tiny-base"

    def __init__(self, adapters: dict[str, str] | None = None, *, slots: int = 3,
                 broken: frozenset[str] = frozenset()) -> None:
        self.slots = slots
        self.broken = broken  # sources that fail to load
        self.infos: dict[str, dict[str, Any]] = {}
        for name, source in (adapters or {}).items():
            self._add(name, source)

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestDelta]:
        raise AssertionError("these tests never generate")
        yield  # pragma: no cover

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

    def adapter_names(self) -> list[str]:
        return list(self.infos)

    def pinned(self) -> set[str]:
        return {name for name, info in self.infos.items() if info["pinned"]}

    def _get(self, name: str) -> dict[str, Any]:
        if name not in self.infos:
            raise UnknownAdapterError(name)
        return self.infos[name]

    async def register_adapter(self, name: str, source: str) -> dict[str, Any]:
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
        del self.infos[name]
        return {"id": name, "object": "adapter", "deleted": True, "in_flight": 0}
