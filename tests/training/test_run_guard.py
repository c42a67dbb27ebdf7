"""One trainer per job: the output lock, the child dying with its runner, orphans ended on restart."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eventually import eventually
from training.cli import main as train_main
from training.jobs import PROCESS_RECORD, JobManager
from training.run_guard import LOCK_NAME, end_orphan, hold_output, is_held, write_process_record

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, /proc and flock")

REPO = Path(__file__).resolve().parents[2]
CHAT = json.dumps({"messages": [{"role": "user", "content": "Hello world!"},
                                {"role": "assistant", "content": "The lazy dog."}]}) + "\n"


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X")


def _train_args(data: Path, output: Path) -> list[str]:
    return ["--model", "unused-model", "--data", str(data), "--output", str(output), "--overwrite", "--no-progress"]


def test_a_second_trainer_on_the_same_output_refuses_while_the_lock_is_held(tmp_path, capsys) -> None:
    data, output = tmp_path / "train.jsonl", tmp_path / "out"
    data.write_text(CHAT)
    output.mkdir()
    (output / "events.jsonl").write_text('{"type": "message", "message": "the running trainer\'s"}\n')
    with hold_output(output):
        assert train_main(_train_args(data, output)) == 2
    assert f"in use by another training run (process {os.getpid()})" in capsys.readouterr().err
    # Nothing of the running trainer's was cleared by the one that refused (it asked for --overwrite).
    assert "the running trainer's" in (output / "events.jsonl").read_text()
    assert not is_held(output)


_RUNNER = """
import io, json, sys, time
from training.jobs import JobManager
root, model = sys.argv[1], sys.argv[2]
manager = JobManager(root, base_model=model, model_name="tiny", poll_interval=0.05,
                     train_args=["--device", "cpu"], env={"OMP_NUM_THREADS": "1"})
manager.start()
file_id = manager.files.add("t.jsonl", io.BytesIO(sys.stdin.read().encode()), "fine-tune").id
job = manager.create_job(model="tiny", training_file=file_id, hyperparameters={"max_steps": 100000})
while True:
    events, _ = manager.list_events(job["id"], limit=100)
    if any(e["type"] == "metrics" for e in events):
        break
    time.sleep(0.05)
print(json.dumps({"job": job["id"], "pid": manager._procs[job["id"]].pid}), flush=True)
time.sleep(600)
"""


def test_a_killed_job_runner_takes_its_trainer_with_it(tmp_path, tiny_model_factory, capsys) -> None:
    model, root = tiny_model_factory("llama"), tmp_path / "jobs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, str(root), str(model)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        runner.stdin.write(CHAT * 8)
        runner.stdin.close()
        line = runner.stdout.readline()  # the runner prints once its trainer is training
        assert line, f"the runner exited with {runner.wait()}"
        started = json.loads(line)
        trainer, output = started["pid"], root / "jobs" / started["job"] / "output"
        assert is_held(output) and not _gone(trainer)

        # While it trains, a second trainer on the job's directory refuses to start.
        assert train_main(_train_args(root / "files" / "unused.jsonl", output)) == 2
        assert f"(process {trainer})" in capsys.readouterr().err

        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        eventually(lambda: _gone(trainer), 15, f"the trainer {trainer} exits with its runner", interval=0.05)
        eventually(lambda: not is_held(output), 5, "the job's lock is free", interval=0.05)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
        runner.stdout.close()


def _orphan(output: Path) -> subprocess.Popen[bytes]:
    """A stand-in for a trainer a killed server left behind: holds the lock in its own session."""
    code = ("import sys, time\nfrom training.run_guard import hold_output\n"
            "with hold_output(sys.argv[1]):\n    print('holding', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(output)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"holding\n"
    return proc


def test_a_restarted_manager_ends_an_orphan_trainer_before_requeueing_its_job(tmp_path) -> None:
    first = JobManager(tmp_path, base_model="b", model_name="b")
    file_id = first.files.add("t.jsonl", io.BytesIO(CHAT.encode()), "fine-tune").id
    job = first.create_job(model="b", training_file=file_id)
    record = first._jobs[job["id"]]
    record.status = "running"  # the server was killed while this job trained
    record.save()
    orphan = _orphan(record.output_dir)
    try:
        write_process_record(record.directory / PROCESS_RECORD, orphan.pid)
        again = JobManager(tmp_path, base_model="b", model_name="b")
        assert orphan.wait(5) == -signal.SIGTERM  # ended before the constructor returned
        assert not is_held(record.output_dir) and not (record.directory / PROCESS_RECORD).exists()
        assert again.get_job(job["id"])["status"] == "validating_files"  # queued again: it runs alone
        messages = [e["message"] for e in again.list_events(job["id"], limit=50)[0]]
        assert any(f"Stopped the training process {orphan.pid}" in m for m in messages)
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait(10)
        orphan.stdout.close()


def test_a_recorded_pid_now_used_by_another_process_is_not_signalled(tmp_path) -> None:
    output = tmp_path / "out"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        record = tmp_path / PROCESS_RECORD
        write_process_record(record, bystander.pid)
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "start_time": data["start_time"] - 1}))  # another process's
        with hold_output(output):  # held, but not by the recorded process
            assert end_orphan(record, output) is None
        assert bystander.poll() is None
        assert (output / LOCK_NAME).exists()
    finally:
        bystander.kill()
        bystander.wait(10)
