"""Adapters registered, pinned or deleted over the admin API survive a restart.

The admin routes change the engine's registry, the one source of truth while the server runs;
each change that succeeded is also written to the store, and when the next server's engine is
ready the same adapters are registered again and the same ones pinned. The routes themselves
stay unaware of this: their endpoints are wrapped, and only a successful answer is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from server.http.routing import ApiRoute, Endpoint
from server.store import Store

logger = logging.getLogger(__name__)


def journaled(routes: Sequence[BaseRoute], store: Store) -> list[BaseRoute]:
    """`routes` with the adapter changes they declare (`Operation.journal`) written to `store`."""
    recorders: dict[str, Callable[[dict[str, Any]], None]] = {
        "register": lambda body: store.remember_adapter(body["id"], body["source"]),
        "delete": lambda body: store.forget_adapter(body["id"]),
        "pin": lambda body: store.set_pinned(body["id"], True),
        "unpin": lambda body: store.set_pinned(body["id"], False),
    }
    out: list[BaseRoute] = []
    for route in routes:
        change = route.operation.journal if isinstance(route, ApiRoute) else None
        if change is None:
            out.append(route)
        elif change not in recorders:
            raise ValueError(f"{route.path}: the journal records no change named {change!r}")
        else:
            out.append(route.with_endpoint(_recording(route.endpoint, recorders[change])))
    return out


def journaled_routes(routes: Iterable[BaseRoute]) -> list[ApiRoute]:
    """The routes among `routes` whose successful answers the journal records."""
    return [route for route in routes if isinstance(route, ApiRoute) and route.operation.journal is not None]


def _recording(endpoint: Endpoint, record: Callable[[dict[str, Any]], None]) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        response = await endpoint(request)
        if 200 <= response.status_code < 300:
            body = json.loads(bytes(response.body))
            await asyncio.to_thread(record, body)
        return response

    return wrapped


async def restore_adapters(store: Store, engine: Any) -> None:
    """Register the journaled adapters again and pin the pinned ones (the server's lifespan calls it
    once the engine is ready)."""
    for record in await asyncio.to_thread(store.adapters):
        if record.deleted:
            continue
        try:
            if record.source is not None and not engine.has_adapter(record.name):
                await _register_again(engine, record.name, record.source)
            if record.pinned and engine.has_adapter(record.name):
                await engine.promote_adapter(record.name)
        except Exception as exc:  # the others still come back
            logger.warning("could not restore adapter %s: %s", record.name, exc)


async def _register_again(engine: Any, name: str, source: str) -> None:
    # A directory from the adapter root was registered by a client: it is checked again as a
    # client's source (still inside the root, its files too), not trusted as the operator's.
    config = getattr(engine, "adapter_config", None)
    root = getattr(config, "adapter_root", None)
    if root is not None and Path(source).is_absolute():
        relative = _relative_to(Path(source), Path(root))
        if relative is not None:
            await engine.register_adapter(name, relative)
            return
    await engine.add_adapter(name, source)


def _relative_to(path: Path, root: Path) -> str | None:
    try:
        return str(path.relative_to(root.resolve()))
    except (ValueError, OSError):
        return None
