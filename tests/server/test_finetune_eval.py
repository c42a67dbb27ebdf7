"""A fine-tuning job with a validation file is evaluated when it finishes: the base and `ft-<job-id>`
answer the validation prompts in-process, and the scores arrive as an `eval` event of the job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.demo import DEMO_MODEL_NAME
from tests.eventually import eventually
from tests.server.conftest import LiveServer
from tests.server.test_finetune_e2e import EXAMPLES, _start

VALIDATION_LINES = 4


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = _start(tmp_path_factory.mktemp("jobs"))
    yield server
    server.stop()


@pytest.mark.slow
def test_a_job_with_a_validation_file_reports_eval_scores(live: LiveServer, tmp_path: Path) -> None:
    client = live.client()
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(EXAMPLES.read_text().splitlines(keepends=True)[:VALIDATION_LINES]))
    with open(EXAMPLES, "rb") as train, open(validation, "rb") as valid:
        training_file = client.files.create(file=train, purpose="fine-tune").id
        validation_file = client.files.create(file=valid, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=DEMO_MODEL_NAME, training_file=training_file,
                                         validation_file=validation_file, seed=1,
                                         hyperparameters={"max_steps": 2, "batch_size": 2})  # type: ignore[arg-type]
    job = eventually(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed")
                      and j, 150, "the job to finish")
    assert job.status == "succeeded", job.error

    def eval_event():  # type: ignore[no-untyped-def]
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        return next((e for e in events if e.type == "eval"), None)

    event = eventually(eval_event, 120, "the eval event")
    name = f"ft-{job.id}"
    data = event.data
    assert data["models"] == [DEMO_MODEL_NAME, name] and data["file"] == validation_file
    assert data["prompts"] == VALIDATION_LINES
    for model in (DEMO_MODEL_NAME, name):
        scores = data["scores"][model]
        # Every validation answer is JSON: both exact match and JSON validity are scored on every prompt.
        assert scores["exact_match"]["total"] == scores["json_valid"]["total"] == VALIDATION_LINES
        assert scores["errors"] == {"count": 0, "total": VALIDATION_LINES}
    assert data["scores"][DEMO_MODEL_NAME]["json_valid"]["passed"] == 0  # the demo base never answers JSON
    assert event.message.startswith(f"Evaluation of {name} against {DEMO_MODEL_NAME}: exact_match 0.00 -> ")

    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    ordered = list(reversed(messages))  # oldest first: training, success, then the evaluation
    assert ordered.index("The job has successfully completed.") < ordered.index(
        f"Evaluating {name} against {DEMO_MODEL_NAME} on {VALIDATION_LINES} prompt(s) of the validation file "
        f"{validation_file}.") < ordered.index(event.message)
