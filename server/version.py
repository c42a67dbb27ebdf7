"""Quiver's version, and the `system_fingerprint` its responses carry."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata


def _installed_version() -> str:
    try:
        return metadata.version("quiver")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0+unknown"


VERSION = _installed_version()


@functools.lru_cache(maxsize=1024)
def system_fingerprint(model: str) -> str:
    """`fp_quiver_<hash>`: the same for every response of one served model (base or adapter) on one
    build of Quiver, different when either changes, as OpenAI's fingerprint marks a backend change."""
    digest = hashlib.sha256(f"{VERSION}\0{model}".encode()).hexdigest()[:12]
    return f"fp_quiver_{digest}"
