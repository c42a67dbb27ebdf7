"""Checkpoints of fine-tuning jobs: published before rotation can touch them, consistent after a
cancel, and still served after a restart that reruns the job.

The child here writes and rotates checkpoints the way `training.trainer` does (the same
`prune_checkpoints`, honouring `--save-total-limit`), fast, while registering is slow: the
manager must never let a checkpoint be deleted while it is registered or being registered.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.eventually import eventually
from tests.training.test_jobs import _fake_python
from training.checkpoints import check_servable
from training.job_record import TERMINAL
from training.jobs import JobManager

pytestmark = pytest.mark.skipif(os.name != "posix", reason="uses a shell launcher")

CHAT = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"


def _trainer(tmp_path: Path, adapter: Path, steps: int, pause: float, then_sleep: bool = False) -> str:
    """A child that writes `steps` checkpoints `pause` seconds apart, rotating them like the trainer."""
    return _fake_python(tmp_path, f"""
import os, shutil, tempfile, time
from training.checkpoints import CHECKPOINTS_DIR, prune_checkpoints
from training.events import EventLog
limit = int(args[args.index('--save-total-limit') + 1])
shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
(out / 'events.jsonl').unlink(missing_ok=True)
with EventLog(out / 'events.jsonl') as events:
    for step in range(1, {steps} + 1):
        root = out / CHECKPOINTS_DIR
        root.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=root, prefix='.stage-'))
        shutil.copytree({str(adapter)!r}, staging, dirs_exist_ok=True)
        (staging / 'run.txt').write_text(os.environ.get('FAKE_RUN', ''))
        os.rename(staging, root / f'ckpt-{{step}}')
        events.emit('checkpoint', step=step, path=str(root / f'ckpt-{{step}}'), metrics={{'step': step}})
        for old_step, old_path in prune_checkpoints(out, limit):
            events.emit('checkpoint_removed', step=old_step, path=str(old_path))
        time.sleep({pause})
    if {then_sleep}:
        time.sleep(120)
    shutil.copytree({str(adapter)!r}, out, dirs_exist_ok=True)
    events.emit('done', step={steps}, trained_tokens=5)
""")


class SlowRegistry:
    """Registers like the engine would (reads the adapter), slowly; checks every registered one still exists."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.ready: dict[str, Path] = {}
        self.removed: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def live(self) -> dict[str, Path]:
        with self._lock:
            return dict(self.ready)

    def add(self, name: str, path: Path) -> None:
        time.sleep(self.delay)
        try:
            check_servable(path)
        except Exception as exc:
            self.failures.append(f"{name}: {exc}")
            raise
        with self._lock:
            self.ready[name] = path
        self.assert_consistent()

    def remove(self, name: str) -> None:
        with self._lock:
            self.ready.pop(name, None)
            self.removed.append(name)

    def assert_consistent(self) -> None:
        missing = [n for n, p in self.live().items() if not p.is_dir()]
        assert not missing, f"registered, but their files are gone: {missing}"


def _manager(root: Path, python: str, registry: SlowRegistry, **options) -> JobManager:
    return JobManager(root, base_model="b", model_name="b", python=python, poll_interval=0.02,
                      on_adapter_ready=registry.add, on_adapter_removed=registry.remove, **options)


def _wait(predicate, timeout: float, what: str) -> None:
    eventually(predicate, timeout, what, interval=0.02)


def _create(manager: JobManager, limit: int) -> str:
    file_id = manager.files.add("t.jsonl", io.BytesIO(CHAT.encode()), "fine-tune").id
    return manager.create_job(model="b", training_file=file_id, hyperparameters={"save_total_limit": limit})["id"]


def _listed(manager: JobManager, job_id: str) -> dict[str, int]:
    items, _ = manager.list_checkpoints(job_id, limit=100)
    return {c["fine_tuned_model_checkpoint"]: c["step_number"] for c in items}


def test_every_checkpoint_registers_before_rotation_can_delete_it(tmp_path, tiny_model_factory,
                                                                  tiny_adapter_factory) -> None:
    adapter = tiny_adapter_factory(tiny_model_factory("llama"))
    registry = SlowRegistry()
    manager = _manager(tmp_path / "m", _trainer(tmp_path / "child", adapter, steps=20, pause=0.0), registry)
    manager.start()
    try:
        job_id = _create(manager, limit=2)
        _wait(lambda: manager.get_job(job_id)["status"] in TERMINAL, 60, "the job ends")
    finally:
        manager.close()
    name = f"ft-{job_id}"
    assert manager.get_job(job_id)["status"] == "succeeded" and registry.failures == []
    assert registry.removed == [f"{name}:ckpt-{s}" for s in range(1, 19)]  # oldest first, each after it served
    assert set(registry.live()) == {name, f"{name}:ckpt-19", f"{name}:ckpt-20"}
    assert _listed(manager, job_id) == {f"{name}:ckpt-20": 20, f"{name}:ckpt-19": 19}
    registry.assert_consistent()
    assert sorted(p.name for p in (tmp_path / "m" / "jobs" / job_id / "checkpoints").iterdir()) == \
        ["ckpt-19", "ckpt-20"]


def test_a_cancelled_job_keeps_exactly_the_checkpoints_it_registered(tmp_path, tiny_model_factory,
                                                                     tiny_adapter_factory) -> None:
    adapter = tiny_adapter_factory(tiny_model_factory("llama"))
    registry = SlowRegistry()
    root = tmp_path / "m"
    manager = _manager(root, _trainer(tmp_path / "child", adapter, steps=10_000, pause=0.01), registry)
    manager.start()
    try:
        job_id = _create(manager, limit=3)
        _wait(lambda: len(registry.removed) >= 3, 60, "checkpoints rotate")
        manager.cancel_job(job_id)
    finally:
        manager.close()  # waits for the monitor: nothing changes after this
    live = registry.live()
    assert registry.failures == [] and len(live) == 3
    registry.assert_consistent()
    assert set(_listed(manager, job_id)) == set(live)
    again = JobManager(root, base_model="b", model_name="b")  # a restart serves the same ones
    assert again.servable_adapters() == live


def test_published_checkpoints_survive_a_restart_that_reruns_the_job(tmp_path, tiny_model_factory,
                                                                     tiny_adapter_factory) -> None:
    adapter = tiny_adapter_factory(tiny_model_factory("llama"))
    root = tmp_path / "m"
    first_registry = SlowRegistry(delay=0)
    first = _manager(root, _trainer(tmp_path / "one", adapter, steps=3, pause=0, then_sleep=True),
                     first_registry, env={"FAKE_RUN": "1"})
    first.start()
    try:
        job_id = _create(first, limit=5)
        _wait(lambda: len(first_registry.live()) == 3, 60, "three checkpoints register")
    finally:
        first.close()  # the server goes away while the job runs
    name = f"ft-{job_id}"
    registry = SlowRegistry(delay=0)
    second = _manager(root, _trainer(tmp_path / "two", adapter, steps=1, pause=0, then_sleep=True), registry,
                      env={"FAKE_RUN": "2"})
    assert second.get_job(job_id)["status"] == "validating_files"
    served = second.servable_adapters()
    assert set(served) == {f"{name}:ckpt-{s}" for s in (1, 2, 3)}
    assert all((path / "run.txt").read_text() == "1" for path in served.values())
    assert set(_listed(second, job_id)) == set(served)
    for checkpoint, path in served.items():  # what the server registers when its engine is ready
        registry.add(checkpoint, path)
    second.start()
    try:  # the rerun's step 1 replaces the first run's; steps 2 and 3 stay served
        _wait(lambda: f"{name}:ckpt-1" in registry.removed and f"{name}:ckpt-1" in registry.live(), 60,
              "the rerun publishes its first checkpoint")
    finally:
        second.close()
    live = registry.live()
    assert (live[f"{name}:ckpt-1"] / "run.txt").read_text() == "2"
    assert {(live[f"{name}:ckpt-{s}"] / "run.txt").read_text() for s in (2, 3)} == {"1"}
    assert registry.failures == [] and registry.removed == [f"{name}:ckpt-1"]
    registry.assert_consistent()
