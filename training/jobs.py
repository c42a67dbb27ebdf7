"""Fine-tuning jobs: each runs `python -m training` in its own process, so serving never stalls.

States follow OpenAI's: validating_files -> queued -> running -> succeeded | failed | cancelled.
One monitor thread moves jobs along: it re-checks their files, starts queued jobs while
fewer than `max_concurrent` run, tails each child's events.jsonl (metrics, checkpoints,
errors) and reaps it when it exits. The final adapter, when the child exits cleanly, is
handed to `on_adapter_ready("ft-<job-id>", path)`.

Checkpoints are published by the manager, not served from where the child writes them: the
child keeps every checkpoint it writes, and the monitor thread, in event order, moves each
into the job's `checkpoints/`, hands it to `on_adapter_ready("ft-<job-id>:ckpt-<step>", path)`
and only then rotates out the oldest beyond `save_total_limit` (`on_adapter_removed(name)`,
then its files). So a checkpoint is never deleted while it is being registered or while it
is registered, and published ones outlive a restart that reruns the job (a rerun's step N
replaces the old step N). The callbacks run on the monitor thread: one that must reach an
event loop or engine thread posts to it and waits. A failure there, in the child, or a cancel
leaves the manager as it was, with the reason in the job's `error` and events.

A job with a validation file is evaluated once it has succeeded, when the manager has an
`evaluate` callback: the validation chats become prompts whose expected answer is their last
assistant message (`training.evaluate.cases_from_chats`), `evaluate([base, "ft-<job-id>"], cases)`
scores them, and the scores are appended as an event of type `eval`. It runs on its own thread,
so the monitor goes on meanwhile; its events follow the job's `succeeded` event.

Layout under `root`: `files/` (uploads) and `jobs/<job-id>/` with `job.json` (the record),
`events.jsonl` (the API's events), `validation.jsonl` (its copy of the validation file), `train.log` (the child's output), `checkpoints/ckpt-<step>/`
(published checkpoints), `trainer.pid` (while a child runs) and `output/` (the `quiver train`
output directory: adapter, checkpoints not yet published, its own events, loss.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.checkpoints import CHECKPOINTS_DIR, checkpoint_name
from training.data import DataError, read_records
from training.errors import ConflictError, InvalidRequestError, NotFoundError
from training.evaluate import EvalCase, cases_from_chats
from training.events import EVENTS_NAME, read_events
from training.files import DEFAULT_MAX_BYTES, FileStore
from training.job_params import cli_arguments, merge_hyperparameters, resolve_hyperparameters, train_config
from training.job_record import TERMINAL, JobRecord, fine_tuned_model_name, load_records, page
from training.run_guard import PARENT_PID_ENV, end_orphan, write_process_record

logger = logging.getLogger(__name__)

AdapterCallback = Callable[[str, Path], None]
# (models to compare, the prompts) -> per model, per metric {"passed", "total", "rate"} (training.evaluate.summarize)
Evaluator = Callable[[Sequence[str], list[EvalCase]], dict[str, Any]]
MAX_EVAL_PROMPTS = 100  # of the validation file, the first ones
_REPO_ROOT = Path(__file__).resolve().parent.parent
_KILL_GRACE_S = 5.0
PROCESS_RECORD = "trainer.pid"  # in the job directory while its trainer runs
_CHILD_KEEPS_EVERY_CHECKPOINT = 2**31 - 1  # the manager rotates checkpoints once they are published

__all__ = ["JobManager", "fine_tuned_model_name"]


_RESTARTED = "The server stopped while the job was running; the job is queued again and starts over."

class JobManager:
    """Runs fine-tuning jobs of `base_model` (the path or hub id the server loaded), called `model_name`.

    train_args: extra `quiver train` flags for every job (e.g. `--device cpu`, `--max-length 4096`).
    env:        extra environment for the child processes (e.g. `CUDA_VISIBLE_DEVICES`, `OMP_NUM_THREADS`).
    max_upload_bytes: the largest training file accepted.
    evaluate:   scores the base and a finished job's adapter on its validation file (see above).
    """

    def __init__(self, root: Path, *, base_model: str, model_name: str,
                 on_adapter_ready: AdapterCallback | None = None,
                 on_adapter_removed: Callable[[str], None] | None = None,
                 max_concurrent: int = 1, train_args: Sequence[str] = (), python: str = sys.executable,
                 env: dict[str, str] | None = None, poll_interval: float = 0.2,
                 max_upload_bytes: int = DEFAULT_MAX_BYTES, evaluate: Evaluator | None = None) -> None:
        self.root = Path(root)
        self.files = FileStore(self.root / "files", max_bytes=max_upload_bytes)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.base_model, self.model_name = str(base_model), model_name
        self.on_adapter_ready, self.on_adapter_removed = on_adapter_ready, on_adapter_removed
        self.max_concurrent, self.train_args, self.python = max_concurrent, list(train_args), python
        self.env = dict(env or {})
        self.poll_interval = poll_interval
        self.evaluate = evaluate
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._offsets: dict[str, int] = {}
        self._jobs: dict[str, JobRecord] = {}
        for record in load_records(self.jobs_dir):
            self._end_orphan(record)
            if record.status == "running":  # its process died with the previous server (or was just ended)
                record.requeue(_RESTARTED)
            self._jobs[record.id] = record

    @staticmethod
    def _end_orphan(record: JobRecord) -> None:
        # A trainer that outlived a killed server must not train on beside the job's next run.
        pid = end_orphan(record.directory / PROCESS_RECORD, record.output_dir)
        if pid is not None:
            logger.warning("stopped training process %s of job %s, left running by a previous server", pid, record.id)
            record.add_event(f"Stopped the training process {pid}, left running by the previous server.",
                             level="warn")

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._monitor, name="finetune-jobs", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop monitoring; running jobs are killed and queued again (they start over when a
        manager over the same directory starts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            procs, self._procs = self._procs, {}
        for job_id, proc in procs.items():
            _kill(proc)
            (self.jobs_dir / job_id / PROCESS_RECORD).unlink(missing_ok=True)
        with self._lock:  # after the kill: no event of the old run lands after the requeue
            for job_id in procs:
                if self._jobs[job_id].status == "running":
                    self._jobs[job_id].requeue(_RESTARTED)

    def servable_adapters(self) -> dict[str, Path]:
        """Adapters finished jobs left on disk, by served name (to register when the server starts)."""
        out: dict[str, Path] = {}
        with self._lock:
            for job in self._jobs.values():
                out.update({c["fine_tuned_model_checkpoint"]: Path(c["path"]) for c in job.checkpoints
                            if Path(c["path"]).is_dir()})
                if job.status == "succeeded" and job.fine_tuned_model:
                    out[job.fine_tuned_model] = job.output_dir
        return out

    # ------------------------------------------------------------------ API
    def create_job(self, *, model: str, training_file: str, validation_file: str | None = None,
                   hyperparameters: dict[str, Any] | None = None, method: dict[str, Any] | None = None,
                   seed: int | None = None, suffix: str | None = None,
                   metadata: dict[str, str] | None = None) -> dict[str, Any]:
        if model not in (self.model_name, self.base_model):
            raise InvalidRequestError(f"Model {model!r} cannot be fine-tuned here; this server fine-tunes "
                                      f"its base model {self.model_name!r}.", param="model",
                                      code="model_not_available")
        self.files.get(training_file)
        if validation_file is not None:
            self.files.get(validation_file)
        hp = resolve_hyperparameters(merge_hyperparameters(hyperparameters, method))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidRequestError(f"seed must be a non-negative integer, got {seed!r}", param="seed")
        job_id = f"ftjob-{secrets.token_hex(6)}"  # short: it is part of the served model name
        while job_id in self._jobs or (self.jobs_dir / job_id).exists():
            job_id = f"ftjob-{secrets.token_hex(6)}"
        record = JobRecord.new(self.jobs_dir / job_id, job_id, model=self.model_name, training_file=training_file,
                               validation_file=validation_file, hyperparameters=hp,
                               seed=seed if seed is not None else secrets.randbelow(2**31),
                               suffix=suffix, metadata=metadata or {})
        with self._lock:
            self._jobs[job_id] = record
        record.add_event(f"Created fine-tuning job: {job_id}")
        self._wake.set()
        return record.to_openai()

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._job(job_id).to_openai()

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created_ns, j.id), reverse=True)
            items, more = page(jobs, after, limit, key=lambda j: j.id)
            return [j.to_openai() for j in items], more

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        with self._lock:
            events = list(reversed(self._job(job_id).events))
        return page(events, after, limit, key=lambda e: e["id"])

    def list_checkpoints(self, job_id: str, after: str | None = None,
                         limit: int = 10) -> tuple[list[dict[str, Any]], bool]:
        with self._lock:
            job = self._job(job_id)
            items = [job.checkpoint_to_openai(c) for c in reversed(job.checkpoints)]
        return page(items, after, limit, key=lambda c: c["id"])

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(job_id)
            if job.status in TERMINAL:
                raise ConflictError(f"Job {job_id} has already {job.status}; it cannot be cancelled.",
                                    param="fine_tuning_job_id", code="job_not_cancellable")
            proc = self._procs.pop(job_id, None)
            job.set_status("cancelled", "The job was cancelled.")
        if proc is not None:
            _kill(proc)
            (job.directory / PROCESS_RECORD).unlink(missing_ok=True)
        return self.get_job(job_id)

    def _job(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id!r}.", param="fine_tuning_job_id",
                                code="job_not_found")
        return job

    # ------------------------------------------------------------------ the monitor thread
    def _monitor(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the monitor must outlive any one job's surprise
                logger.exception("fine-tuning monitor step failed")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            pending = [j for j in self._jobs.values() if j.status == "validating_files"]
        for job in pending:
            self._validate(job)
        with self._lock:
            running = list(self._procs.items())
        for job_id, proc in running:
            self._follow(job_id, proc)
        with self._lock:
            queued = sorted((j for j in self._jobs.values() if j.status == "queued"), key=lambda j: j.created_ns)
            for job in queued[: max(0, self.max_concurrent - len(self._procs))]:
                try:
                    self._launch(job)
                except Exception as exc:  # a job that cannot start fails alone, once
                    logger.exception("starting fine-tuning job %s failed", job.id)
                    job.fail("launch_failed", f"The training process could not start: {type(exc).__name__}: {exc}")

    def _validate(self, job: JobRecord) -> None:
        try:
            for file_id, param in ((job.training_file, "training_file"), (job.validation_file, "validation_file")):
                if file_id is not None:
                    path = self.files.path(self.files.get(file_id).id)
                    read_records(path, label=file_id, param=param)
        except (DataError, NotFoundError) as exc:
            param = exc.param if isinstance(exc, DataError) else "training_file"
            with self._lock:
                if job.status == "validating_files":
                    job.fail(f"invalid_{param}", str(exc), param=param)
            return
        with self._lock:
            if job.status == "validating_files":
                job.set_status("queued", "Files validated; the job is queued.")

    def _launch(self, job: JobRecord) -> None:
        job.output_dir.parent.mkdir(parents=True, exist_ok=True)
        # A rerun's events are read from the start: none of the previous run's may be read as its own.
        (job.output_dir / EVENTS_NAME).unlink(missing_ok=True)
        valid = None
        if job.validation_file is not None:
            valid = self.files.copy_to(job.validation_file, job.directory / "validation.jsonl")
        config = train_config(job.hyperparameters, model=self.base_model,
                              data=self.files.copy_to(job.training_file, job.directory / "training.jsonl"),
                              output=job.output_dir, validation_data=valid, seed=job.seed,
                              name=job.fine_tuned_name)
        if config.save_total_limit > 0:
            config = dataclasses.replace(config, save_total_limit=_CHILD_KEEPS_EVERY_CHECKPOINT)
        command = [self.python, "-m", "training", *cli_arguments(config), "--no-progress", "--overwrite",
                   *self.train_args]
        env = dict(os.environ)
        # The child imports this package from where the server found it, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.update(self.env)
        env[PARENT_PID_ENV] = str(os.getpid())  # the child ends itself when this process dies
        with open(job.directory / "train.log", "ab") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=job.directory, env=env, start_new_session=os.name == "posix")
        write_process_record(job.directory / PROCESS_RECORD, proc.pid)
        self._procs[job.id] = proc
        self._offsets[job.id] = 0
        job.started_at = int(time.time())
        job.set_status("running", f"Fine-tuning job started (process {proc.pid}).")

    def _follow(self, job_id: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.poll()  # before reading: every event of an exited child is then on disk
        job = self._jobs[job_id]
        events, self._offsets[job_id] = read_events(job.output_dir / EVENTS_NAME, self._offsets.get(job_id, 0))
        for event in events:
            self._on_event(job, event)
        if code is None:
            return
        with self._lock:
            if self._procs.pop(job_id, None) is None:
                return  # cancelled meanwhile
        (job.directory / PROCESS_RECORD).unlink(missing_ok=True)
        if code == 0 and job.final_event is not None:
            self._succeed(job)
        else:
            with self._lock:
                if job.status == "running":
                    job.fail_from_child(code, job.directory / "train.log")

    def _on_event(self, job: JobRecord, event: dict[str, Any]) -> None:
        kind = event.get("type")
        with self._lock:
            job.record_child_event(event)
        if kind == "checkpoint":
            self._publish_checkpoint(job, int(event["step"]), Path(event["path"]), event)

    # ------------------------------------------------------------------ checkpoints (monitor thread only)
    def _publish_checkpoint(self, job: JobRecord, step: int, written: Path, event: dict[str, Any]) -> None:
        """Move the child's checkpoint out of its reach, register it, then rotate: in this order, on
        one thread, so no checkpoint is deleted while it is registered or being registered."""
        target = job.directory / CHECKPOINTS_DIR / checkpoint_name(step)
        with self._lock:
            replaced = any(c["step_number"] == step for c in job.checkpoints)
        if (replaced or target.exists()) and not self._retire_checkpoint(job, step):
            return  # the earlier run's step is still served; this one is not published
        try:
            target.parent.mkdir(exist_ok=True)
            os.rename(written, target)
        except OSError as exc:
            with self._lock:
                job.add_event(f"Could not publish the checkpoint at step {step}: {exc}", level="warn")
            return
        if not self._register(job, job.checkpoint_name(step), target):
            shutil.rmtree(target, ignore_errors=True)
            return
        with self._lock:
            job.add_checkpoint(step, target, event)
            limit = _checkpoint_limit(job)
            doomed = [c["step_number"] for c in job.checkpoints[: max(0, len(job.checkpoints) - limit)]]
        for old in doomed:  # oldest published first
            if not self._retire_checkpoint(job, old):
                break

    def _retire_checkpoint(self, job: JobRecord, step: int) -> bool:
        """Unregister a published checkpoint, then delete it; False (files kept) if unregistering failed."""
        name = job.checkpoint_name(step)
        if self.on_adapter_removed is not None:
            try:
                self.on_adapter_removed(name)
            except Exception as exc:
                logger.exception("unregistering checkpoint %s failed", name)
                with self._lock:
                    job.add_event(f"Could not unregister {name}, so it is kept: {type(exc).__name__}: {exc}",
                                  level="warn")
                return False
        with self._lock:
            paths = [Path(c["path"]) for c in job.checkpoints if c["step_number"] == step]
            job.drop_checkpoint(step)
        for path in paths or [job.directory / CHECKPOINTS_DIR / checkpoint_name(step)]:
            shutil.rmtree(path, ignore_errors=True)
        return True

    def _register(self, job: JobRecord, name: str, path: Path) -> bool:
        if self.on_adapter_ready is None:
            return True
        try:
            self.on_adapter_ready(name, path)
        except Exception as exc:
            logger.exception("registering adapter %s failed", name)
            with self._lock:
                job.add_event(f"Could not register {name}: {type(exc).__name__}: {exc}", level="warn")
            return False
        return True

    def _succeed(self, job: JobRecord) -> None:
        name = job.fine_tuned_name
        registered = self._register(job, name, job.output_dir)
        with self._lock:
            if job.status != "running":
                return  # cancelled while the adapter was being registered
            if registered:
                job.succeed(name)
                evaluated = self.evaluate is not None and job.validation_file is not None
            else:
                job.fail("adapter_registration_failed",
                         f"Training finished, but the server could not load the adapter {name}; see the events.")
                evaluated = False
        if evaluated:
            threading.Thread(target=self._evaluate, args=(job,), name=f"evaluate-{job.id}", daemon=True).start()

    # ------------------------------------------------------------------ evaluation (its own thread)
    def _evaluate(self, job: JobRecord) -> None:
        assert self.evaluate is not None
        models = [self.model_name, job.fine_tuned_name]
        try:
            cases = cases_from_chats(_read_jsonl(job.directory / "validation.jsonl"))[:MAX_EVAL_PROMPTS]
            if not cases:
                self._eval_event(job, "No evaluation: the validation file has no chat with an assistant answer.")
                return
            self._eval_event(job, f"Evaluating {models[1]} against {models[0]} on {len(cases)} prompt(s) of the "
                                  f"validation file {job.validation_file}.")
            scores = self.evaluate(models, cases)
        except Exception as exc:  # the job has succeeded; a failed evaluation only says so
            logger.exception("evaluating fine-tuning job %s failed", job.id)
            self._eval_event(job, f"The evaluation failed: {type(exc).__name__}: {exc}", level="warn")
            return
        data = {"file": job.validation_file, "prompts": len(cases), "models": models, "scores": scores}
        self._eval_event(job, _eval_message(models, scores), type="eval", data=data)

    def _eval_event(self, job: JobRecord, message: str, **fields: Any) -> None:
        with self._lock:
            if not self._stop.is_set():  # a closed manager's directory may belong to a new one
                job.add_event(message, **fields)


def _read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _eval_message(models: Sequence[str], scores: dict[str, Any]) -> str:
    """`Evaluation: exact_match 0.00 -> 0.80 (5 prompts), ...`, base first, adapter second."""
    base, tuned = (scores.get(m, {}) for m in models)
    parts = [f"{metric} {base[metric]['rate']:.2f} -> {tuned[metric]['rate']:.2f} ({tuned[metric]['total']} prompts)"
             for metric in tuned if metric != "errors" and metric in base]
    errors = sum(scores.get(m, {}).get("errors", {}).get("count", 0) for m in models)
    tail = f"; {errors} request(s) failed" if errors else ""
    return f"Evaluation of {models[1]} against {models[0]}: " + (", ".join(parts) or "nothing scored") + tail


def _checkpoint_limit(job: JobRecord) -> int:
    """How many published checkpoints the job keeps (its `save_total_limit`)."""
    return train_config(job.hyperparameters, model="-", data=Path("-"), output=Path("-")).save_total_limit


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the child and anything it started; escalate to SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    except ProcessLookupError:
        proc.wait()
