"""Adapter directories on disk: the final adapter, intermediate checkpoints, their metadata.

Layout of a run's output directory:

    OUTPUT/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT)
    OUTPUT/training_metadata.json                           base model, data hashes, settings, metrics
    OUTPUT/events.jsonl, OUTPUT/loss.png                    what happened, and the loss curve
    OUTPUT/checkpoints/ckpt-<step>/                         servable PEFT adapters with their metadata

Every adapter is written in a hidden staging directory and renamed into place, so a
reader (the job manager, a server) never sees half of one. Each is then read back with
`adapters.peft_format` and `adapters.weights`, the server's own loaders, so a run fails
loudly instead of producing something the server would refuse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_spec

METADATA_NAME = "training_metadata.json"
CHECKPOINTS_DIR = "checkpoints"
_CKPT = re.compile(r"^ckpt-(\d+)$")
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME, "README.md")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step}"


def save_adapter(model: Any, directory: Path, metadata: dict[str, Any], *, servable: bool = True) -> Path:
    """Save `model`'s LoRA weights as a PEFT directory at `directory` (replacing the adapter files there).

    servable: check the result with the server's loaders first (False: publish it unchecked).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        # The vocabulary is unchanged: saying so skips peft's look-up of the base model's config.
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        _normalize_config(staging / CONFIG_NAME)
        (staging / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if servable:
            check_servable(staging)
        _publish(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _normalize_config(path: Path) -> None:
    # peft writes target_modules from a set, in hash-seed order; sorted, equal runs give equal bytes.
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _publish(staging: Path, directory: Path) -> None:
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp makes owner-only entries
    if not directory.exists():
        os.rename(staging, directory)
        return
    # The output root holds other files (events, plot, checkpoints): swap in the adapter's own,
    # weights before config, so the config never points at stale weights.
    for name in (WEIGHTS_NAME, METADATA_NAME, "README.md", CONFIG_NAME):
        if (staging / name).exists():
            os.replace(staging / name, directory / name)


def check_servable(directory: Path) -> None:
    """Raise (adapters' own errors) if the server could not load this adapter."""
    spec = read_adapter_spec(directory, directory.name)
    from adapters.weights import load_adapter  # torch: imported only when a checkpoint is checked

    load_adapter(directory, directory.name, expected_shapes=None, num_layers=None, max_rank=spec.max_rank)


def save_checkpoint(model: Any, output: Path, step: int, metadata: dict[str, Any], *, servable: bool = True) -> Path:
    return save_adapter(model, Path(output) / CHECKPOINTS_DIR / checkpoint_name(step), metadata, servable=servable)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, directory) of each complete checkpoint under `output`, oldest first."""
    root = Path(output) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CKPT.match(path.name)
        if match and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(output: Path, keep: int) -> list[tuple[int, Path]]:
    """Delete all but the `keep` newest checkpoints; returns what was deleted."""
    found = list_checkpoints(output)
    doomed = found[: max(0, len(found) - keep)]
    for _, path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_metadata(directory: Path) -> dict[str, Any]:
    """The training metadata saved with an adapter ({} when there is none)."""
    path = Path(directory) / METADATA_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def has_adapter(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() or (directory / WEIGHTS_NAME).is_file()
