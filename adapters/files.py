"""Which files an adapter may read: those of an adapter from the adapter root resolve inside it.

A directory under the root may hold symlinks; one named `adapter_config.json` that leads to a
file elsewhere would let whoever placed the adapter read that file through the server (its
values echoed in validation errors). Paths the operator named are trusted as they are, and hub
snapshots are links into the hub cache by design, so only root adapters are confined.
"""

from __future__ import annotations

from pathlib import Path

from adapters.errors import UnsafeAdapterPathError


def confined(path: Path, root: Path | str | None, adapter: str) -> Path:
    """`path` itself when `root` is None; else its real path, which must lie inside `root`.

    Errors name the file, never where it leads or what it holds.
    """
    if root is None:
        return path
    try:
        real = Path(path).resolve()
        base = Path(root).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13
        raise UnsafeAdapterPathError(adapter, f"{path.name} cannot be resolved ({type(exc).__name__})") from None
    if not real.is_relative_to(base):
        raise UnsafeAdapterPathError(
            adapter, f"{path.name} is a link leading outside the adapter root; it is not read"
        )
    return real
