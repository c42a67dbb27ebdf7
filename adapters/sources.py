"""Where an adapter's files come from: a directory (under the adapter root, or named by the
operator) or a Hugging Face hub repository, and the names adapters are served under.

Names and request-supplied sources are untrusted: a name is a single safe path component, and a
directory named by a client must resolve (symlinks included) inside the operator's adapter root,
so no request can make the server read files anywhere else. Paths the operator passes on the
command line are trusted as they are.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapters.errors import AdapterNotFoundError
from adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
MAX_SOURCE_CHARS = 1024  # a hub id with its revision is under 330; a path this long is no adapter
_SHOWN_CHARS = 80
# ':' is allowed after the first character: fine-tuning checkpoints are served as
# `ft-<job-id>:ckpt-<step>`, the OpenAI form of a checkpoint's model name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
# What a hub adapter needs; pickle weights are never fetched (they would be refused anyway).
_HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME]


class AdapterSourceError(ValueError):
    """A name or source a client or operator gave is malformed or points outside the root."""


@dataclass(frozen=True)
class AdapterSource:
    """A local directory (`location` is its absolute path) or a hub repo id at a revision.

    root: for a directory from the adapter root, the root, which its files must not lead out of.
    """

    kind: Literal["dir", "hub"]
    location: str
    revision: str | None = None
    root: str | None = None

    def describe(self) -> str:
        if self.kind == "hub":
            return HUB_PREFIX + self.location + (f"@{self.revision}" if self.revision else "")
        return self.location


def validate_name(name: object) -> str:
    """`name` if it can name an adapter (one path component, no `..`), else AdapterSourceError."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise AdapterSourceError(
            f"invalid adapter name {_show(name)}: use 1-128 letters, digits, '.', '_', ':' or '-', starting with "
            "a letter or digit, without '..' or '/'"
        )
    return name


def is_valid_name(name: object) -> bool:
    try:
        validate_name(name)
    except AdapterSourceError:
        return False
    return True


def parse_hub(text: str) -> AdapterSource:
    """`hf://org/repo[@revision]` as a hub source."""
    spec = text[len(HUB_PREFIX):]
    repo_id, _, revision = spec.partition("@")
    if not _HUB_ID.match(repo_id) or ".." in repo_id:
        raise AdapterSourceError(f"invalid hub repo id {_show(repo_id)} in {_show(text)}; expected hf://org/name[@revision]")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise AdapterSourceError(f"invalid hub revision {_show(revision)} in {_show(text)}")
    return AdapterSource("hub", repo_id, revision or None)


def source_from_request(text: object, root: Path | None) -> AdapterSource:
    """A source a client sent: `hf://org/repo[@rev]`, or a directory relative to the adapter root."""
    if not isinstance(text, str) or not text.strip():
        raise AdapterSourceError(f"source must be a non-empty string, got {_show(text)}")
    if len(text) > MAX_SOURCE_CHARS:
        raise AdapterSourceError(
            f"source is {len(text)} characters long; at most {MAX_SOURCE_CHARS} are allowed ({_show(text)})"
        )
    text = text.strip()
    if text.startswith(HUB_PREFIX):
        return parse_hub(text)
    if root is None:
        raise AdapterSourceError(
            "the server has no adapter root (--adapter-root), so only hub sources (hf://org/name) can be "
            f"registered; got {_show(text)}"
        )
    if "\x00" in text or "\\" in text:
        raise AdapterSourceError(f"invalid source path {_show(text)}")
    relative = Path(text)
    if relative.is_absolute() or text.startswith("~"):
        raise AdapterSourceError(f"source {_show(text)} must be a path relative to the adapter root, not absolute")
    if ".." in relative.parts:
        raise AdapterSourceError(f"source {_show(text)} must not contain '..'")
    path = _inside_root(root, relative, text)
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise AdapterSourceError(f"source {_show(text)} cannot be read ({exc.strerror})") from None
    if not is_dir:
        raise AdapterSourceError(f"no adapter directory {_show(text)} under the adapter root")
    return AdapterSource("dir", str(path), root=str(root.resolve()))


def source_from_operator(value: str | Path) -> AdapterSource:
    """A source the operator named (`--adapter NAME=PATH`): any local path, or `hf://...`."""
    text = str(value)
    if text.startswith(HUB_PREFIX):
        return parse_hub(text)
    return AdapterSource("dir", str(Path(text).expanduser().resolve()))


def find_in_root(root: Path | None, name: str) -> AdapterSource | None:
    """The adapter directory `root/name`, if `name` is valid and it holds an adapter config."""
    try:
        return _root_entry(root, name)
    except AdapterSourceError:
        return None


def scan_root(root: Path | None) -> dict[str, AdapterSource]:
    """Every adapter directory directly under `root`, by name.

    Entries that cannot be served (an invalid name, a link leading out of the root) are logged
    and skipped; hidden entries and directories without an adapter config are skipped quietly.
    """
    if root is None or not root.is_dir():
        return {}
    found = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):  # hidden by convention (.cache, .git)
            continue
        try:
            source = _root_entry(root, child.name)
        except AdapterSourceError as exc:
            logger.warning("adapter root %s: skipping %r: %s", root, child.name, exc)
            continue
        if source is not None:
            found[child.name] = source
    return found


def _root_entry(root: Path | None, name: str) -> AdapterSource | None:
    # None: not an adapter directory; AdapterSourceError: one that must not be served, and why.
    if root is None:
        return None
    validate_name(name)
    path = _inside_root(root, Path(name), name)
    try:
        has_config = (path / CONFIG_NAME).is_file()
    except OSError as exc:
        raise AdapterSourceError(f"cannot read {name!r} ({exc.strerror})") from None
    return AdapterSource("dir", str(path), root=str(root.resolve())) if has_config else None


def materialize(name: str, source: AdapterSource, cache_dir: Path | None = None) -> Path:
    """The local directory holding `source`'s files (hub: the cached or downloaded snapshot)."""
    if source.kind == "dir":
        path = Path(source.location)
        if not path.is_dir():
            raise AdapterNotFoundError(name, f"adapter directory {source.location!r} does not exist")
        return path
    return _hub_snapshot(name, source, cache_dir)


def _hub_snapshot(name: str, source: AdapterSource, cache_dir: Path | None) -> Path:
    # huggingface_hub honours HF_HUB_OFFLINE (only the local cache is read) and HF_HUB_CACHE.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            source.location,
            revision=source.revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=_HUB_FILES,
        )
    except LocalEntryNotFoundError as exc:
        where = cache_dir or constants.HF_HUB_CACHE
        mode = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        raise AdapterNotFoundError(
            name, f"{source.describe()} is not in the local hub cache ({where}){mode}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise AdapterNotFoundError(name, f"hub repository {source.describe()} does not exist") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise AdapterNotFoundError(name, f"could not fetch {source.describe()}: {exc}") from exc
    return Path(path)


def _inside_root(root: Path, relative: Path, shown: str) -> Path:
    try:
        base = root.resolve()
        path = (base / relative).resolve()
    except (OSError, RuntimeError) as exc:  # too long a name, a symlink loop (RuntimeError before 3.13)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise AdapterSourceError(f"source {_show(shown)} cannot be resolved ({reason})") from None
    if path == base or not path.is_relative_to(base):
        raise AdapterSourceError(f"source {_show(shown)} resolves outside the adapter root")
    return path


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"
