"""ServerState's model resolution: memory only on the event loop; a name not registered is looked
for under the adapter root through the engine's off-loop lookup, before it is resolved."""

from __future__ import annotations

import asyncio

import pytest

from server.http.errors import APIError
from server.state import ServerState
from tests.server.fake_engine import FakeEngine


class _Spy(FakeEngine):
    """Fails the test if the disk-reading `has_adapter` is called; counts the off-loop lookups."""

    def __init__(self) -> None:
        super().__init__({"known": "/adapters/known"})
        self.looked_up: list[str] = []
        self.on_disk: set[str] = set()

    def has_adapter(self, name: str) -> bool:
        raise AssertionError("has_adapter may read the disk: not on the request path")

    async def find_adapter(self, name: str) -> bool:
        self.looked_up.append(name)
        if name in self.on_disk:
            self._add(name, f"/root/{name}")
        return name in self.infos


def test_resolving_reads_memory_and_discovery_looks_up_only_unregistered_names() -> None:
    engine = _Spy()
    state = ServerState(engine)
    state.ready = True  # as the lifespan leaves it once the engine runs
    engine.on_disk.add("dropped")

    async def run() -> None:
        for requested in (None, "", engine.model_name, "known", 7, ["x"]):
            await state.discover(requested)
        assert engine.looked_up == []  # base, registered or not a name: nothing to look for
        await state.discover_in({"model": "dropped"})
        await state.discover_in(["not", "a", "dict"])
        await state.discover("missing")
        assert engine.looked_up == ["dropped", "missing"]

    asyncio.run(run())
    assert state.resolve_model("known") == "known" and state.resolve_model("dropped") == "dropped"
    assert state.resolve_model(None) is None and state.resolve_model(engine.model_name) is None
    with pytest.raises(APIError) as info:
        state.resolve_model("missing")
    assert info.value.status == 404
