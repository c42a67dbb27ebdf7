"""The job manager with real `python -m training` children on a tiny model.

A failing job, a cancelled job and a good one run side by side: the good one must still
succeed, register its adapter and its checkpoints, and leave everything on disk for a
restarted manager; a job created after all that must still start.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eventually import eventually
from training.errors import ConflictError, InvalidRequestError, NotFoundError
from training.job_record import TERMINAL
from training.jobs import JobManager

CHILD_ENV = {"OMP_NUM_THREADS": "1"}  # see tests/training/conftest.py


def _chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


def _upload(manager: JobManager, text: str, name: str = "train.jsonl") -> str:
    return manager.files.add(name, io.BytesIO(text.encode()), "fine-tune").id


def _wait(manager: JobManager, job_id: str, until, timeout: float = 90.0) -> dict:
    """The job once `until(job)` holds."""
    return eventually(lambda: (lambda job: job if until(job) else None)(manager.get_job(job_id)), timeout,
                      f"job {job_id} leaves {manager.get_job(job_id)['status']}", interval=0.05)


def _events(manager: JobManager, job_id: str) -> list[dict]:
    events, more = manager.list_events(job_id, limit=100)
    assert not more
    return list(reversed(events))  # oldest first


class Registry:
    def __init__(self) -> None:
        self.ready: dict[str, Path] = {}
        self.removed: list[str] = []

    def add(self, name: str, path: Path) -> None:
        assert path.is_dir()
        self.ready[name] = path


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory) -> Iterator[dict]:
    model_dir = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("jobs")
    registry = Registry()
    manager = JobManager(root, base_model=str(model_dir), model_name="tiny", on_adapter_ready=registry.add,
                         on_adapter_removed=registry.removed.append, max_concurrent=3, poll_interval=0.05,
                         train_args=["--device", "cpu"], env=CHILD_ENV)
    manager.start()
    good = _upload(manager, "".join(_chat(q, "The lazy dog.") for q in ("Hello world!", "The quick fox.",
                                                                        "Un café.", "Emoji 🎯")) * 2)
    long = _upload(manager, _chat("Hi", "Yo") + _chat("Hello world! " * 20, "ok"), "long.jsonl")
    failing = manager.create_job(model="tiny", training_file=long, hyperparameters={"max_length": 32})
    endless = manager.create_job(model="tiny", training_file=good, hyperparameters={"max_steps": 100000})
    job = manager.create_job(model="tiny", training_file=good, validation_file=good, seed=3, suffix="dog",
                             hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 50,
                                              "lora_rank": 4, "save_total_limit": 2})
    _wait(manager, endless["id"], lambda j: any(e["type"] == "metrics" for e in _events(manager, j["id"])))
    cancelled = manager.cancel_job(endless["id"])
    failed = _wait(manager, failing["id"], lambda j: j["status"] in TERMINAL)
    done = _wait(manager, job["id"], lambda j: j["status"] in TERMINAL)
    # After a failure and a cancel the manager still takes jobs and starts them.
    after = manager.create_job(model="tiny", training_file=good)
    started = _wait(manager, after["id"], lambda j: j["status"] == "running")
    manager.cancel_job(after["id"])
    yield {"manager": manager, "registry": registry, "root": root, "model_dir": model_dir, "good": good,
           "failed": failed, "cancelled": cancelled, "endless": endless, "done": done, "created": job,
           "after": started}
    manager.close()


def test_a_failing_job_says_why(runs) -> None:
    failed = runs["failed"]
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert failed["error"]["code"] == "invalid_training_file"
    assert failed["error"]["param"] == "training_file"
    assert "line 2: too long" in failed["error"]["message"]
    assert failed["fine_tuned_model"] is None
    assert _events(runs["manager"], failed["id"])[-1]["level"] == "error"


def test_a_cancelled_job_stops_its_process(runs) -> None:
    manager = runs["manager"]
    assert runs["cancelled"]["status"] == "cancelled"
    job = manager.get_job(runs["endless"]["id"])
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    log = Path(runs["root"], "jobs", job["id"], "output", "events.jsonl")
    size = log.stat().st_size
    time.sleep(0.5)  # an absence over a window (nothing may write), not a wait for a condition
    assert log.stat().st_size == size  # nothing trains any more
    with pytest.raises(ConflictError, match="already cancelled"):
        manager.cancel_job(job["id"])


def test_a_later_job_succeeds_and_its_adapters_are_registered(runs) -> None:
    manager, done = runs["manager"], runs["done"]
    assert runs["created"]["status"] == "validating_files"
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"] == f"ft-{done['id']}"
    assert done["trained_tokens"] > 0 and done["seed"] == 3 and done["suffix"] == "dog"
    assert done["hyperparameters"]["n_epochs"] == 3 and done["hyperparameters"]["lora_rank"] == 4

    events = _events(manager, done["id"])
    messages = [e["message"] for e in events]
    assert messages[0].startswith("Created fine-tuning job")
    assert "Files validated; the job is queued." in messages
    assert messages[-1] == "The job has successfully completed."
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert "valid_loss" in metrics[-1]

    checkpoints, _ = manager.list_checkpoints(done["id"])
    assert [c["step_number"] for c in checkpoints] == [6, 4]  # newest first; step 2 rotated out
    assert all(c["fine_tuned_model_checkpoint"] == f"ft-{done['id']}:ckpt-{c['step_number']}" for c in checkpoints)
    assert checkpoints[0]["metrics"]["train_loss"] == pytest.approx(metrics[-1]["train_loss"])

    registry = runs["registry"]
    name = done["fine_tuned_model"]
    assert registry.ready[name] == Path(runs["root"], "jobs", done["id"], "output")
    assert {f"{name}:ckpt-{s}" for s in (2, 4, 6)} <= set(registry.ready)
    assert registry.removed == [f"{name}:ckpt-2"]
    assert (registry.ready[name] / "adapter_model.safetensors").is_file()
    assert (registry.ready[name] / "loss.png").is_file()


def test_listing_is_newest_first_with_cursors(runs) -> None:
    manager = runs["manager"]
    jobs, more = manager.list_jobs(limit=2)
    assert more and jobs[0]["id"] == runs["after"]["id"]
    rest, more = manager.list_jobs(after=jobs[-1]["id"], limit=10)
    assert not more and {j["id"] for j in jobs + rest} == {runs["done"]["id"], runs["failed"]["id"],
                                                           runs["endless"]["id"], runs["after"]["id"]}
    first, more = manager.list_events(runs["done"]["id"], limit=3)
    second, _ = manager.list_events(runs["done"]["id"], after=first[-1]["id"], limit=3)
    assert more and first[0]["message"] == "The job has successfully completed."
    assert first[-1]["created_at"] >= second[0]["created_at"] and first[-1]["id"] != second[0]["id"]


def test_a_restarted_manager_keeps_finished_jobs_and_their_adapters(runs) -> None:
    again = JobManager(runs["root"], base_model=str(runs["model_dir"]), model_name="tiny")
    done = again.get_job(runs["done"]["id"])
    assert done == runs["manager"].get_job(done["id"])
    adapters = again.servable_adapters()
    name = done["fine_tuned_model"]
    assert adapters[name] == Path(runs["root"], "jobs", done["id"], "output")
    assert set(adapters) >= {name, f"{name}:ckpt-4", f"{name}:ckpt-6"}
    assert f"{name}:ckpt-2" not in adapters
    assert again.files.get(runs["good"]).examples == 8


def test_bad_requests_are_refused_before_anything_runs(tmp_path, runs) -> None:
    manager = JobManager(tmp_path, base_model="/models/base", model_name="base")
    file_id = _upload(manager, _chat("q", "a"))
    with pytest.raises(InvalidRequestError, match="cannot be fine-tuned here") as info:
        manager.create_job(model="gpt-4o-mini", training_file=file_id)
    assert info.value.param == "model"
    with pytest.raises(NotFoundError, match="No such file"):
        manager.create_job(model="base", training_file="file-missing")
    with pytest.raises(NotFoundError):
        manager.create_job(model="base", training_file=file_id, validation_file="file-missing")
    with pytest.raises(InvalidRequestError, match="unknown hyperparameter"):
        manager.create_job(model="base", training_file=file_id, hyperparameters={"epochs": 3})
    with pytest.raises(InvalidRequestError, match="seed must be"):
        manager.create_job(model="base", training_file=file_id, seed=-1)
    with pytest.raises(NotFoundError, match="No such fine-tuning job"):
        manager.get_job("ftjob-nope")
    assert manager.list_jobs() == ([], False)


def test_cancel_before_start_and_restart_of_an_interrupted_job(tmp_path) -> None:
    manager = JobManager(tmp_path, base_model="/models/base", model_name="base")  # never started
    file_id = _upload(manager, _chat("q", "a"))
    waiting = manager.create_job(model="base", training_file=file_id)
    assert manager.cancel_job(waiting["id"])["status"] == "cancelled"
    running = manager.create_job(model="base", training_file=file_id)
    record = manager._jobs[running["id"]]
    record.status = "running"  # as if the server died with its child
    record.save()
    queued = manager.create_job(model="base", training_file=file_id)
    again = JobManager(tmp_path, base_model="/models/base", model_name="base")
    interrupted = again.get_job(running["id"])  # queued again: it starts over
    assert interrupted["status"] == "validating_files" and interrupted["error"] is None
    events, _ = again.list_events(running["id"], limit=50)
    assert "queued again" in events[0]["message"] and events[0]["level"] == "warn"
    assert again.get_job(queued["id"])["status"] == "validating_files"  # will still run
    assert again.get_job(waiting["id"])["status"] == "cancelled"


@pytest.mark.skipif(os.name != "posix", reason="uses a shell launcher")
def test_a_job_running_at_shutdown_is_queued_again_and_reruns(tmp_path) -> None:
    sleeper = _fake_python(tmp_path / "child", "import time\ntime.sleep(60)\n")
    first = JobManager(tmp_path / "m", base_model="b", model_name="b", python=sleeper, poll_interval=0.05)
    first.start()
    try:
        job = first.create_job(model="b", training_file=_upload(first, _chat("q", "a")))
        _wait(first, job["id"], lambda j: j["status"] == "running", timeout=20)
    finally:
        first.close()
    assert first.get_job(job["id"])["status"] == "validating_files"
    second = JobManager(tmp_path / "m", base_model="b", model_name="b", python=sleeper, poll_interval=0.05)
    again = second.get_job(job["id"])
    assert again["status"] == "validating_files" and again["error"] is None and again["trained_tokens"] is None
    second.start()
    try:
        _wait(second, job["id"], lambda j: j["status"] == "running", timeout=20)
    finally:
        second.close()
    messages = [e["message"] for e in second.list_events(job["id"], limit=50)[0]]
    assert sum("queued again" in m for m in messages) == 2 and sum("job started" in m for m in messages) == 2


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the interpreter: runs `body` with the job's arguments."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text("import json, sys, pathlib\nargs = sys.argv[1:]\nout = pathlib.Path(args[args.index('--output') + 1])\n"
                      + body)
    launcher = tmp_path / "python"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    return str(launcher)


@pytest.mark.skipif(os.name != "posix", reason="uses a shell launcher")
def test_a_child_that_dies_without_a_word_and_a_registration_failure(tmp_path, tiny_model_factory,
                                                                      tiny_adapter_factory) -> None:
    crash = _fake_python(tmp_path / "a", "print('segfault-ish trouble', flush=True)\nsys.exit(3)\n")
    manager = JobManager(tmp_path / "m1", base_model="b", model_name="b", python=crash, poll_interval=0.05)
    manager.start()
    try:
        job = manager.create_job(model="b", training_file=_upload(manager, _chat("q", "a")))
        failed = _wait(manager, job["id"], lambda j: j["status"] in TERMINAL, timeout=20)
    finally:
        manager.close()
    assert failed["status"] == "failed" and failed["error"]["code"] == "training_error"
    assert "exited with status 3" in failed["error"]["message"]
    assert "segfault-ish trouble" in failed["error"]["message"]

    adapter = tiny_adapter_factory(tiny_model_factory("llama"))
    finish = _fake_python(tmp_path / "b", (
        f"import shutil\nshutil.copytree({str(adapter)!r}, out, dirs_exist_ok=True)\n"
        "(out / 'events.jsonl').write_text(json.dumps({'type': 'done', 'step': 1, 'trained_tokens': 5}) + '\\n')\n"
    ))

    def refuse(name: str, path: Path) -> None:
        raise RuntimeError(f"no room for {name}")

    manager = JobManager(tmp_path / "m2", base_model="b", model_name="b", python=finish, poll_interval=0.05,
                         on_adapter_ready=refuse)
    manager.start()
    try:
        job = manager.create_job(model="b", training_file=_upload(manager, _chat("q", "a")))
        failed = _wait(manager, job["id"], lambda j: j["status"] in TERMINAL, timeout=20)
        later = manager.create_job(model="b", training_file=_upload(manager, _chat("q", "a")))
        assert _wait(manager, later["id"], lambda j: j["status"] in TERMINAL, timeout=20)["status"] == "failed"
    finally:
        manager.close()
    assert failed["error"]["code"] == "adapter_registration_failed"
    assert any("no room for ft-" in e["message"] for e in _events(manager, job["id"]))


def test_a_job_whose_process_cannot_start_fails_alone(tmp_path) -> None:
    manager = JobManager(tmp_path, base_model="b", model_name="b", python=str(tmp_path / "no-python"),
                         poll_interval=0.05)
    manager.start()
    try:
        file_id = _upload(manager, _chat("q", "a"))
        first = manager.create_job(model="b", training_file=file_id)
        failed = _wait(manager, first["id"], lambda j: j["status"] in TERMINAL, timeout=20)
        second = manager.create_job(model="b", training_file=file_id)
        assert _wait(manager, second["id"], lambda j: j["status"] in TERMINAL, timeout=20)["status"] == "failed"
    finally:
        manager.close()
    assert failed["status"] == "failed" and failed["error"]["code"] == "launch_failed"
    assert "could not start" in failed["error"]["message"]
