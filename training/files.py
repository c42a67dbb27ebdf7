"""Uploaded training files: checked on arrival, stored under one directory, described as OpenAI files.

`ROOT/<file-id>.jsonl` holds the bytes, `ROOT/<file-id>.json` the description; a file is
visible only once both are written, so a crash mid-upload leaves nothing half-listed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from training.data import DataError, summarize
from training.errors import InvalidRequestError, NotFoundError, TooLargeError

PURPOSE = "fine-tune"
DEFAULT_MAX_BYTES = 512 * 2**20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str
    examples: int
    sha256: str

    def to_openai(self) -> dict[str, Any]:
        """The `file` object the openai client parses."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


class FileStore:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._records: dict[str, FileRecord] = {}
        for meta in sorted(self.root.glob("file-*.json")):
            try:
                record = FileRecord(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a description we cannot read is not a file we can serve
            if self.path(record.id).is_file():
                self._records[record.id] = record

    def add(self, filename: str, source: BinaryIO, purpose: str = PURPOSE) -> FileRecord:
        """Store and check an upload; InvalidRequestError (with line numbers) when the data is bad."""
        if purpose != PURPOSE:
            raise InvalidRequestError(f"purpose must be {PURPOSE!r} (the only files Quiver stores), "
                                      f"got {purpose!r}", param="purpose")
        name = os.path.basename(filename or "") or "upload.jsonl"
        file_id = f"file-{secrets.token_hex(12)}"
        path = self.path(file_id)
        try:
            size = self._copy(source, path)
            summary = summarize(path, label=name, param="file")
        except DataError as exc:
            path.unlink(missing_ok=True)
            raise InvalidRequestError(f"The file is not valid fine-tuning data:\n{exc}", param="file",
                                      code="invalid_file") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        record = FileRecord(id=file_id, filename=name, bytes=size, created_at=int(time.time()), purpose=purpose,
                            examples=summary.examples, sha256=summary.sha256)
        tmp = self.root / f".{file_id}.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
        os.replace(tmp, self.root / f"{file_id}.json")
        with self._lock:
            self._records[file_id] = record
        return record

    def _copy(self, source: BinaryIO, path: Path) -> int:
        size = 0
        with open(path, "wb") as out:
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise TooLargeError(f"The file is larger than the {self.max_bytes} bytes allowed.",
                                        param="file")
                out.write(chunk)
        return size

    def get(self, file_id: str) -> FileRecord:
        with self._lock:
            record = self._records.get(file_id)
        if record is None:
            raise NotFoundError(f"No such file: {file_id!r}.", param="file_id", code="file_not_found")
        return record

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def list(self) -> list[FileRecord]:
        """Newest first."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.created_at, r.id), reverse=True)

    def copy_to(self, file_id: str, target: Path) -> Path:
        """Copy a stored file (a job keeps its own copy, whatever happens to the upload later)."""
        shutil.copyfile(self.path(self.get(file_id).id), target)
        return target
