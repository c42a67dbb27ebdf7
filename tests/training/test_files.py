from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from training.errors import InvalidRequestError, NotFoundError, TooLargeError
from training.files import FileStore

GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_upload_is_checked_stored_and_survives_a_restart(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    record = store.add("../evil/train.jsonl", io.BytesIO(((GOOD + "\n") * 3).encode()), "fine-tune")
    assert record.filename == "train.jsonl"  # no path from the client survives
    assert record.examples == 3 and record.bytes == len((GOOD + "\n") * 3)
    assert store.path(record.id).read_text() == (GOOD + "\n") * 3
    shape = record.to_openai()
    assert shape["object"] == "file" and shape["purpose"] == "fine-tune" and shape["status"] == "processed"
    again = FileStore(tmp_path)
    assert again.get(record.id) == record
    assert [r.id for r in again.list()] == [record.id]


def test_bad_data_is_refused_with_the_line_and_not_kept(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    bad = GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n"
    with pytest.raises(InvalidRequestError) as info:
        store.add("t.jsonl", io.BytesIO(bad.encode()), "fine-tune")
    assert "t.jsonl: line 2: no assistant turn" in info.value.message
    assert info.value.param == "file" and info.value.code == "invalid_file"
    assert store.list() == [] and list(tmp_path.glob("file-*")) == []


def test_purpose_size_and_unknown_ids(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=100)
    with pytest.raises(InvalidRequestError, match="purpose must be 'fine-tune'"):
        store.add("t.jsonl", io.BytesIO(GOOD.encode()), "batch")
    with pytest.raises(TooLargeError):
        store.add("t.jsonl", io.BytesIO((GOOD + "\n").encode() * 5), "fine-tune")
    assert list(tmp_path.glob("file-*")) == []
    with pytest.raises(NotFoundError, match="No such file"):
        store.get("file-nope")


def test_a_line_nested_too_deeply_is_refused_with_its_line(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    deep = GOOD + "\n" + "{\"a\":" * 100_000 + "1" + "}" * 100_000 + "\n"
    with pytest.raises(InvalidRequestError) as info:
        store.add("deep.jsonl", io.BytesIO(deep.encode()), "fine-tune")
    assert "deep.jsonl: line 2: JSON nested too deeply" in info.value.message
    assert list(tmp_path.glob("file-*")) == []
