"""Adapter names as the engine's callers meet them: the registry's lookups, answered with the
engine's errors (the registry, in adapters/, cannot raise them itself).

These read memory only; a name not registered yet is looked for under the adapter root with
`AdapterRegistry.discover`, which reads the disk, so an event loop runs that on a worker thread
first.
"""

from __future__ import annotations

from adapters.errors import AdapterError
from adapters.registry import AdapterEntry, AdapterRef, AdapterRegistry
from engine.errors import AdapterFailedError, UnknownAdapterError


def acquire(registry: AdapterRegistry, name: str) -> AdapterRef:
    """Count a request against `name` (UnknownAdapterError: 404; AdapterFailedError: 400)."""
    try:
        return registry.acquire(name)
    except KeyError:
        raise UnknownAdapterError(name) from None
    except AdapterError as exc:
        raise AdapterFailedError(name, exc.detail) from None


def named(registry: AdapterRegistry, name: str, *, serving: bool = False) -> AdapterEntry:
    """The live adapter `name` (UnknownAdapterError); with `serving`, AdapterFailedError if it failed."""
    entry = registry.get(name)
    if entry is None:
        raise UnknownAdapterError(name)
    if serving and entry.error is not None:
        raise AdapterFailedError(name, entry.error)
    return entry
