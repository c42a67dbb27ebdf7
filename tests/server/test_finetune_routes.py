"""Files and fine-tuning routes through the real app and the real openai client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from server.app import create_app
from server.finetune.routes import FORM_OVERHEAD_BYTES, finetune_routes
from server.state import ServerState
from server.wiring import build_stateful
from tests.eventually import eventually
from tests.server.conftest import LiveServer
from training.jobs import JobManager

API_KEY = "sekrit"
GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Hello world!"},
                                     {"role": "assistant", "content": "The quick brown fox."}]})


class _StubEngine:
    """What the app needs of an engine to start; these routes never touch it."""

    model_name = "tiny-base"

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def live(tiny_model_factory, tmp_path_factory) -> Iterator[tuple[LiveServer, JobManager, dict[str, Path]]]:
    registered: dict[str, Path] = {}
    manager = JobManager(tmp_path_factory.mktemp("ft"), base_model=str(tiny_model_factory("llama")),
                         model_name="tiny-base", on_adapter_ready=registered.__setitem__, poll_interval=0.05,
                         env={"OMP_NUM_THREADS": "1"})
    manager.start()
    app = create_app(ServerState(_StubEngine()), api_key=API_KEY, extra_routes=finetune_routes(manager))
    server = LiveServer(app).start()
    yield server, manager, registered
    server.stop()
    manager.close()


@pytest.fixture
def client(live) -> OpenAI:
    return OpenAI(base_url=f"{live[0].base_url}/v1", api_key=API_KEY, max_retries=0)


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    return exc.response.json()["error"]


def _upload(client: OpenAI, text: str, name: str = "train.jsonl"):
    return client.files.create(file=(name, text.encode()), purpose="fine-tune")


def test_upload_retrieve_and_list(client) -> None:
    uploaded = _upload(client, (GOOD_LINE + "\n") * 3)
    assert uploaded.object == "file" and uploaded.purpose == "fine-tune" and uploaded.filename == "train.jsonl"
    assert uploaded.bytes == len((GOOD_LINE + "\n") * 3) and uploaded.status == "processed"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list()]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")


def test_bad_uploads_are_400_with_the_line(client) -> None:
    bad = GOOD_LINE + "\n" + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n"
    with pytest.raises(openai.BadRequestError) as info:
        _upload(client, bad, "bad.jsonl")
    error = _error(info.value)
    assert "bad.jsonl: line 2: no assistant turn" in error["message"]
    assert (error["param"], error["code"], error["type"]) == ("file", "invalid_file", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("t.jsonl", GOOD_LINE.encode()), purpose="batch")
    assert _error(info.value)["param"] == "purpose"


def test_a_form_without_a_file_is_400(live) -> None:
    with httpx.Client(base_url=live[0].base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/files", json={"purpose": "fine-tune"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "file"
        response = http.post("/v1/files", data={"purpose": "fine-tune"})
        assert response.status_code == 400 and "`file`" in response.json()["error"]["message"]


def test_routes_need_the_api_key(live) -> None:
    anonymous = OpenAI(base_url=f"{live[0].base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.fine_tuning.jobs.list()
    with pytest.raises(openai.AuthenticationError):
        _upload(anonymous, GOOD_LINE)


def test_bad_job_requests(client) -> None:
    file_id = _upload(client, GOOD_LINE + "\n").id
    cases = [
        (dict(model="gpt-4o-mini", training_file=file_id), openai.BadRequestError, "model"),
        (dict(model="tiny-base", training_file="file-nope"), openai.NotFoundError, "file_id"),
        (dict(model="tiny-base", training_file=file_id, hyperparameters={"n_epochs": "many"}),
         openai.BadRequestError, "hyperparameters.n_epochs"),
        (dict(model="tiny-base", training_file=file_id, method={"type": "dpo"}), openai.BadRequestError,
         "method.type"),
        (dict(model="tiny-base", training_file=file_id, extra_body={"colour": "red"}), openai.BadRequestError,
         "colour"),
    ]
    for kwargs, kind, param in cases:
        with pytest.raises(kind) as info:
            client.fine_tuning.jobs.create(**kwargs)
        assert _error(info.value)["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(limit=0)


def test_a_job_from_upload_to_adapter(client, live) -> None:
    _, _, registered = live
    training = _upload(client, "".join(f"{GOOD_LINE}\n" for _ in range(6)))
    job = client.fine_tuning.jobs.create(
        model="tiny-base", training_file=training.id, seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2,
                                                                          "lora_rank": 2}}},
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2
    job = eventually(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed",
                                                                                         "cancelled") and j,
                     90, "the job finished", interval=0.1)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft-{job.id}" and job.trained_tokens and job.finished_at
    assert job.method.supervised.hyperparameters.batch_size == 2

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=4))  # pages of 4, followed by the client
    assert len(events) > 8 and len({e.id for e in events}) == len(events)
    assert events[0].message == "The job has successfully completed."
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [6, 5, 4, 3, 2, 1]

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"ft-{job.id}:ckpt-6"
    assert checkpoints[0].metrics.train_loss is not None and checkpoints[0].fine_tuning_job_id == job.id
    assert set(registered) >= {f"ft-{job.id}", f"ft-{job.id}:ckpt-3", f"ft-{job.id}:ckpt-6"}

    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    cancelled = client.fine_tuning.jobs.cancel(
        client.fine_tuning.jobs.create(model="tiny-base", training_file=training.id).id)
    assert cancelled.status == "cancelled" and cancelled.error is None


# ---------------------------------------------------------------- uploads: size cap and hostile data
_UPLOAD_CAP = 256 * 1024
_CHUNK = 64 * 1024
_BOUNDARY = "quiverboundary"
_UPLOAD_PATHS = {"/v1/files": "file", "/v1/flow/files": "files"}


@pytest.fixture
def upload_app(tmp_path):
    state = ServerState(_StubEngine())
    stateful = build_stateful(state, [], jobs_dir=tmp_path, base_model="base", model_name="tiny-base",
                              max_upload_bytes=_UPLOAD_CAP)
    return create_app(state, stateful=stateful)


def _form_head(field: str) -> bytes:
    return (f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="t.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()


async def _push(app, path: str, chunks, content_length: int | None) -> tuple[int, dict, int]:
    """Send a multipart body chunk by chunk straight into the ASGI app: (status, body, bytes it pulled)."""
    headers = [(b"content-type", f"multipart/form-data; boundary={_BOUNDARY}".encode())]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    pulled = 0
    sent: list[dict] = []
    iterator = iter(chunks)

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(iterator, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def _endless_upload(field: str, total: int):
    """A multipart upload of `total` bytes of valid JSONL, produced only as it is read."""
    yield _form_head(field)
    line = (GOOD_LINE + "\n").encode()
    block = line * (_CHUNK // len(line))
    for _ in range(total // len(block)):
        yield block


@pytest.mark.parametrize("path", list(_UPLOAD_PATHS))
@pytest.mark.parametrize("declared", ["none", "lying"])
def test_an_oversized_streamed_upload_is_cut_off_near_the_cap(upload_app, path, declared) -> None:
    field = _UPLOAD_PATHS[path]
    body = _endless_upload(field, total=64 * 2**20)  # 256x the cap
    status, error, pulled = asyncio.run(_push(upload_app, path, body, None if declared == "none" else 1000))
    assert status == 413 and error["error"]["param"] == field and str(_UPLOAD_CAP) in error["error"]["message"]
    assert pulled <= _UPLOAD_CAP + FORM_OVERHEAD_BYTES + 2 * _CHUNK  # stopped at the cap, not at the end


@pytest.mark.parametrize("path", list(_UPLOAD_PATHS))
def test_an_upload_declaring_too_many_bytes_is_413_before_any_is_read(upload_app, path) -> None:
    body = _endless_upload(_UPLOAD_PATHS[path], total=64 * 2**20)
    status, error, pulled = asyncio.run(_push(upload_app, path, body, 64 * 2**20))
    assert status == 413 and error["error"]["code"] == "file_too_large"
    assert pulled == 0


@pytest.mark.parametrize("path", list(_UPLOAD_PATHS))
def test_an_upload_under_the_cap_is_stored(upload_app, path) -> None:
    data = ((GOOD_LINE + "\n") * 100).encode()
    body = _form_head(_UPLOAD_PATHS[path]) + data + f"\r\n--{_BOUNDARY}--\r\n".encode()
    status, record, _ = asyncio.run(_push(upload_app, path, [body[:1000], body[1000:]], len(body)))
    assert status == 200, record
    assert record["bytes"] == len(data)


@pytest.mark.parametrize("path", list(_UPLOAD_PATHS))
def test_a_jsonl_line_nested_100k_deep_is_400_naming_its_line(upload_app, path) -> None:
    field = _UPLOAD_PATHS[path]
    data = (GOOD_LINE + "\n" + "[" * 100_000 + "]" * 100_000 + "\n").encode()
    body = _form_head(field) + data + f"\r\n--{_BOUNDARY}--\r\n".encode()
    status, error, _ = asyncio.run(_push(upload_app, path, [body], len(body)))
    assert status == 400, error
    assert "line 2: JSON nested too deeply" in error["error"]["message"]
    assert error["error"]["param"] == "file"


@pytest.mark.parametrize("path", list(_UPLOAD_PATHS))
def test_a_jsonl_line_with_a_5000_digit_integer_is_400_naming_its_line(upload_app, path) -> None:
    # json.loads refuses integers past 4300 digits with a plain ValueError, not a JSONDecodeError.
    field = _UPLOAD_PATHS[path]
    data = (GOOD_LINE + "\n" + '{"messages": ' + "1" * 5000 + "}\n").encode()
    body = _form_head(field) + data + f"\r\n--{_BOUNDARY}--\r\n".encode()
    status, error, _ = asyncio.run(_push(upload_app, path, [body], len(body)))
    assert status == 400, error
    assert "line 2: not valid JSON" in error["error"]["message"]
    assert error["error"]["param"] == "file"
