"""Adapter names, sources under the adapter root (never outside it), hub ids from a local cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from adapters.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    UnsafeAdapterFormatError,
    UnsafeAdapterPathError,
)
from adapters.loader import BaseModelMismatchError, LoadPolicy, base_mismatch, base_names, load_from_source
from adapters.peft_format import read_adapter_spec
from adapters.sources import (
    AdapterSource,
    AdapterSourceError,
    find_in_root,
    materialize,
    scan_root,
    source_from_operator,
    source_from_request,
    validate_name,
)
from tests.adapters.lora_dirs import break_adapter, fake_dims, write_lora_dir

BAD_NAMES = ["../x", "..", "/abs", "/etc/passwd", "a/b", "%2e%2e%2fx", "..%2Fx", "", ".hidden", "x..y",
             "a\\b", "a" * 200, "name with space", "ünï"]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """An adapter root with two adapters, a non-adapter dir, and a valid adapter just outside it."""
    dims = fake_dims()
    root = tmp_path / "root"
    write_lora_dir(root / "alpha", dims)
    write_lora_dir(root / "beta.v2", dims, rank=2)
    (root / "not-an-adapter").mkdir()
    write_lora_dir(tmp_path / "outside", dims)
    return root


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(AdapterSourceError, match="invalid adapter name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "lora-1", "Beta.v2", "x_y-z.0"])
def test_good_names_pass(name: str) -> None:
    assert validate_name(name) == name


def test_root_discovery_finds_adapter_dirs_by_name_only(root: Path) -> None:
    assert set(scan_root(root)) == {"alpha", "beta.v2"}
    assert find_in_root(root, "alpha") == AdapterSource("dir", str((root / "alpha").resolve()), root=str(root.resolve()))
    assert find_in_root(root, "not-an-adapter") is None
    assert find_in_root(root, "../outside") is None
    assert find_in_root(None, "alpha") is None


def test_symlinks_cannot_escape_the_root(root: Path, tmp_path: Path) -> None:
    (root / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert find_in_root(root, "sneaky") is None
    assert "sneaky" not in scan_root(root)
    with pytest.raises(AdapterSourceError, match="outside the adapter root"):
        source_from_request("sneaky", root)


@pytest.mark.parametrize(
    "source, message",
    [
        ("../outside", "must not contain '..'"),
        ("alpha/../../outside", "must not contain '..'"),
        ("/etc", "not absolute"),
        ("~/x", "not absolute"),
        ("missing", "no adapter directory"),
        ("", "non-empty string"),
        ("a\x00b", "invalid source path"),
        ("hf://../x", "invalid hub repo id"),
        ("hf://just-a-name", "invalid hub repo id"),
        ("hf://org/name/extra", "invalid hub repo id"),
        ("hf://org/name@../main", "invalid hub revision"),
    ],
)
def test_request_sources_outside_the_root_or_malformed_are_refused(root: Path, source: str, message: str) -> None:
    with pytest.raises(AdapterSourceError, match=message):
        source_from_request(source, root)


def test_request_sources_resolve_inside_the_root(root: Path) -> None:
    assert source_from_request("alpha", root).location == str((root / "alpha").resolve())
    assert source_from_request("hf://org/ada@v1", root) == AdapterSource("hub", "org/ada", "v1")
    with pytest.raises(AdapterSourceError, match="no adapter root"):
        source_from_request("alpha", None)
    assert source_from_request("hf://org/ada", None).kind == "hub"


def test_operator_sources_may_be_anywhere(tmp_path: Path) -> None:
    assert source_from_operator(tmp_path / "outside") == AdapterSource("dir", str((tmp_path / "outside").resolve()))
    assert source_from_operator("hf://org/ada") == AdapterSource("hub", "org/ada", None)


def _hub_cache(cache: Path, repo_id: str, adapter_dir: Path, revision: str = "main") -> None:
    """Lay out `adapter_dir` as huggingface_hub's cache would hold `repo_id` at `revision`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in adapter_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_hub_sources_come_from_the_local_cache_offline(root: Path, tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by tests/conftest.py before any import
    cache = tmp_path / "hub-cache"
    _hub_cache(cache, "org/ada", root / "alpha")
    path = materialize("ada", AdapterSource("hub", "org/ada"), cache)
    assert (path / "adapter_config.json").is_file() and "models--org--ada" in str(path)
    policy = LoadPolicy(None, None, max_rank=8, hub_cache_dir=cache)
    loaded = load_from_source("ada", AdapterSource("hub", "org/ada"), policy)
    assert loaded.weights.max_rank == 4
    with pytest.raises(AdapterNotFoundError, match="not in the local hub cache.*HF_HUB_OFFLINE"):
        materialize("nope", AdapterSource("hub", "org/not-cached"), cache)
    with pytest.raises(AdapterNotFoundError, match="not in the local hub cache"):
        materialize("ada", AdapterSource("hub", "org/ada", "v9"), cache)


def test_missing_directories_and_pickles_have_clear_errors(tmp_path: Path) -> None:
    policy = LoadPolicy(None, None, max_rank=8)
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        load_from_source("gone", AdapterSource("dir", str(tmp_path / "gone")), policy)
    bad = break_adapter(tmp_path / "pickled", "pickle", fake_dims())
    with pytest.raises(UnsafeAdapterFormatError, match="pickle weights are refused"):
        load_from_source("pickled", AdapterSource("dir", str(bad)), policy)


def test_base_model_names_match_local_copies_and_hub_cache_paths(tmp_path: Path) -> None:
    names = base_names("/models/Tiny-Base", "/cache/models--org--tiny-base/snapshots/abc", None)
    spec = read_adapter_spec(write_lora_dir(tmp_path / "a", fake_dims()))  # trained on org/tiny-base
    assert base_mismatch(spec, names) is None
    assert base_mismatch(spec, base_names("/models/other")) is not None
    assert base_mismatch(spec, frozenset()) is None  # unknown base: nothing to compare


def test_base_mismatch_warns_or_refuses(tmp_path: Path) -> None:
    path = break_adapter(tmp_path / "other", "base", fake_dims())
    source = AdapterSource("dir", str(path))
    names = base_names("org/tiny-base")
    warned = load_from_source("other", source, LoadPolicy(None, None, 8, base_names=names))
    assert "other-org/another-model" in warned.warnings[0]
    with pytest.raises(BaseModelMismatchError, match="names a different model.*refuses"):
        load_from_source("other", source, LoadPolicy(None, None, 8, base_names=names, refuse_base_mismatch=True))


SECRET = "s3cr3t-value-outside-the-root"


def _leaky(root: Path, outside: Path, linked: str) -> Path:
    """`root/leaky`: an adapter whose `linked` file is a symlink to a file outside the root."""
    adapter = write_lora_dir(root / "leaky", fake_dims())
    target = outside / f"outside-{linked}"
    if linked == "adapter_config.json":  # a file an error would quote a value of
        target.write_text(json.dumps({"peft_type": "LORA", "r": SECRET, "target_modules": ["q_proj"]}))
    else:
        target.write_bytes((adapter / linked).read_bytes())
    (adapter / linked).unlink()
    (adapter / linked).symlink_to(target)
    return adapter


@pytest.mark.parametrize("linked", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_files_linking_out_of_the_root_are_not_read(root: Path, tmp_path: Path, linked: str) -> None:
    _leaky(root, tmp_path, linked)
    source = find_in_root(root, "leaky")
    assert source is not None and source.root == str(root.resolve())
    with pytest.raises(UnsafeAdapterPathError, match=f"{linked} is a link leading outside the adapter root") as info:
        load_from_source("leaky", source, LoadPolicy(None, None, max_rank=8))
    assert SECRET not in str(info.value) and str(tmp_path / "outside") not in str(info.value)
    # Once loaded, a reload (path already known) is checked again.
    with pytest.raises(UnsafeAdapterPathError):
        load_from_source("leaky", source, LoadPolicy(None, None, max_rank=8), Path(source.location))
    # The same directory named by the operator is trusted as it is.
    if linked == "adapter_model.safetensors":
        trusted = load_from_source("leaky", source_from_operator(root / "leaky"), LoadPolicy(None, None, max_rank=8))
        assert trusted.weights.max_rank == 4


def test_adapter_files_linking_inside_the_root_are_read(root: Path) -> None:
    shared = write_lora_dir(root / "shared-weights", fake_dims())
    adapter = write_lora_dir(root / "linked", fake_dims())
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(shared / "adapter_model.safetensors")
    source = find_in_root(root, "linked")
    assert source is not None
    assert load_from_source("linked", source, LoadPolicy(None, None, max_rank=8)).weights.max_rank == 4


def test_config_errors_never_quote_file_contents(root: Path) -> None:
    adapter = write_lora_dir(root / "garbled", fake_dims())
    (adapter / "adapter_config.json").write_text(f"{SECRET}\n")
    with pytest.raises(AdapterConfigError, match=r"not valid JSON \(Expecting value at line 1 column 1\)") as info:
        read_adapter_spec(adapter)
    assert SECRET not in str(info.value)
    (adapter / "adapter_config.json").write_bytes(b"{\xff" + SECRET.encode())
    with pytest.raises(AdapterConfigError, match=r"not valid JSON \(not UTF-8\)"):
        read_adapter_spec(adapter)


def test_huge_configs_are_refused_unread(root: Path) -> None:
    adapter = write_lora_dir(root / "huge", fake_dims())
    (adapter / "adapter_config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(AdapterConfigError, match=r"is 2097154 bytes; at most 1048576"):
        read_adapter_spec(adapter)


def test_a_100k_character_source_is_refused_with_its_length(root: Path) -> None:
    with pytest.raises(AdapterSourceError, match="source is 100000 characters long; at most 1024") as info:
        source_from_request("a" * 100_000, root)
    assert len(str(info.value)) < 300
    # Under the bound but over the file system's name limit (ENAMETOOLONG): still a clear refusal.
    with pytest.raises(AdapterSourceError, match="cannot be read \\(File name too long\\)"):
        source_from_request("a" * 1000, root)
    with pytest.raises(AdapterSourceError, match=r"invalid adapter name 'aaaa.*\(100002 characters\)"):
        validate_name("a" * 100_000)


def test_root_entries_leading_out_of_the_root_are_logged_when_skipped(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "bad name").mkdir()
    (root / ".hidden").mkdir()
    with caplog.at_level(logging.WARNING, logger="adapters.sources"):
        assert set(scan_root(root)) == {"alpha", "beta.v2"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping 'sneaky'" in m and "resolves outside the adapter root" in m for m in messages), messages
    assert any("skipping 'bad name'" in m and "invalid adapter name" in m for m in messages), messages
    assert not any("not-an-adapter" in m or ".hidden" in m for m in messages), messages


def test_a_config_linked_to_a_device_outside_the_root_is_refused_as_outside(root: Path) -> None:
    adapter = write_lora_dir(root / "devnull", fake_dims())
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(os.devnull)
    source = find_in_root(root, "devnull")
    with pytest.raises(UnsafeAdapterPathError, match="adapter_config.json is a link leading outside"):
        load_from_source("devnull", source or AdapterSource("dir", str(adapter), root=str(root)),
                         LoadPolicy(None, None, max_rank=8))
