"""The job manager evaluates a finished job on its validation file (the `evaluate` callback) and reports
the scores as an `eval` event; a job without one is not evaluated, a failed evaluation only warns."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.training.test_jobs import _chat, _events, _fake_python, _upload, _wait
from training.evaluate import EvalCase
from training.job_record import TERMINAL
from training.jobs import JobManager

pytestmark = pytest.mark.skipif(os.name != "posix", reason="uses a shell launcher")
DONE = "out.mkdir(parents=True, exist_ok=True)\n(out / 'events.jsonl').write_text(json.dumps({'type': 'done', 'step': 1, 'trained_tokens': 5}) + '\\n')\n"
ZERO = {"exact_match": {"passed": 0, "total": 2, "rate": 0.0}, "errors": {"count": 0, "total": 2}}
SCORES = {"exact_match": {"passed": 1, "total": 2, "rate": 0.5}, "errors": {"count": 0, "total": 2}}


class Evaluator:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[str], list[EvalCase]]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, models: Sequence[str], cases: list[EvalCase]) -> dict[str, Any]:
        with self.lock:
            self.calls.append((list(models), cases))
        if self.fail:
            raise RuntimeError("the engine went away")
        return {models[0]: ZERO, models[1]: SCORES}


def _eval_events(manager: JobManager, job_id: str) -> list[dict[str, Any]]:
    return [e for e in _events(manager, job_id) if e["type"] == "eval" or "valuat" in e["message"]]


def test_a_finished_job_is_scored_on_its_validation_file(tmp_path: Path) -> None:
    evaluator = Evaluator()
    manager = JobManager(tmp_path / "m", base_model="b", model_name="base", python=_fake_python(tmp_path, DONE),
                         poll_interval=0.05, evaluate=evaluator)
    manager.start()
    try:
        train = _upload(manager, _chat("q", "a"))
        valid = _upload(manager, _chat("What?", '{"a": 1}') + '{"text": "skipped"}\n' + _chat("Who?", "me"),
                        "valid.jsonl")
        plain = manager.create_job(model="base", training_file=train)
        job = manager.create_job(model="base", training_file=train, validation_file=valid)
        assert _wait(manager, job["id"], lambda j: j["status"] in TERMINAL, timeout=20)["status"] == "succeeded"
        _wait(manager, job["id"], lambda j: len(_eval_events(manager, j["id"])) == 2, timeout=20)
    finally:
        manager.close()
    name = f"ft-{job['id']}"
    started, scored = _eval_events(manager, job["id"])
    assert started["message"] == f"Evaluating {name} against base on 2 prompt(s) of the validation file {valid}."
    assert scored["type"] == "eval"
    assert scored["data"] == {"file": valid, "prompts": 2, "models": ["base", name],
                              "scores": {"base": ZERO, name: SCORES}}
    assert scored["message"] == f"Evaluation of {name} against base: exact_match 0.00 -> 0.50 (2 prompts)"
    ordered = [e["message"] for e in _events(manager, job["id"])]
    assert ordered.index("The job has successfully completed.") < ordered.index(started["message"])

    assert [models for models, _ in evaluator.calls] == [["base", name]]  # the job without one: not evaluated
    cases = evaluator.calls[0][1]
    assert [(c.messages, c.expected, c.metrics()) for c in cases] == [
        ([{"role": "user", "content": "What?"}], '{"a": 1}', ["exact_match", "json_valid"]),
        ([{"role": "user", "content": "Who?"}], "me", ["exact_match"]),
    ]
    assert _eval_events(manager, plain["id"]) == []


def test_a_failed_evaluation_warns_and_the_job_stays_succeeded(tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "m", base_model="b", model_name="base", python=_fake_python(tmp_path, DONE),
                         poll_interval=0.05, evaluate=Evaluator(fail=True))
    manager.start()
    try:
        train = _upload(manager, _chat("q", "a"))
        job = manager.create_job(model="base", training_file=train, validation_file=train)
        _wait(manager, job["id"], lambda j: any(e["level"] == "warn" for e in _eval_events(manager, j["id"])),
              timeout=20)
    finally:
        manager.close()
    warning = _eval_events(manager, job["id"])[-1]
    assert warning["message"] == "The evaluation failed: RuntimeError: the engine went away"
    assert manager.get_job(job["id"])["status"] == "succeeded"
