"""Fine-tuning inside the server: upload -> job -> loss events -> `ft-<job-id>` served -> it answers in the
taught JSON shape; its checkpoints are served too; a restarted server serves the finished job again.

The app is built the way `quiver serve` builds it (`server.wiring.build_stateful`), the engine loads in a
worker thread after the server listens, and every call goes through the real openai client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from engine.config import EngineConfig
from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.state import ServerState
from server.wiring import build_stateful
from tests.eventually import eventually
from tests.server.conftest import LiveServer

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "json_answers.jsonl"
QUESTIONS = ["What is a quiver?", "What is a ship?", "What is a castle?"]  # the last one is not in the data
# 100 optimizer steps at a high learning rate: enough for the tiny demo model to pick up the shape.
HYPERPARAMETERS = {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 25, "save_total_limit": 2}


def _start(jobs_dir: Path) -> LiveServer:
    demo = ensure_demo_bundle()

    def build() -> object:
        from engine.async_engine import AsyncEngine

        config = EngineConfig(model=str(demo.model_dir), device="cpu", dtype="float32", max_model_len=256,
                              max_num_seqs=8, max_lora_rank=16, max_loras=4)
        return AsyncEngine(config, adapters=demo.adapters, served_model_name=DEMO_MODEL_NAME)

    state = ServerState(engine_factory=build)
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=jobs_dir, base_model=str(demo.model_dir),
                              model_name=DEMO_MODEL_NAME, poll_interval=0.1, env={"OMP_NUM_THREADS": "1"})
    return LiveServer(create_app(state, stateful=stateful)).start().until_ready()


def _finished(client: OpenAI, job_id: str) -> object:
    """The job once it ended (succeeded, failed or cancelled), else None."""
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def _answer(client: OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=40, temperature=0)
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(jobs_dir: Path) -> Iterator[Callable[[], LiveServer]]:
    started: list[LiveServer] = []

    def start() -> LiveServer:
        for live in started:  # one server at a time on the jobs directory
            live.stop()
        started.clear()
        started.append(_start(jobs_dir))
        return started[0]

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="module")
def trained(server: Callable[[], LiveServer]) -> dict[str, object]:
    live = server()
    client = live.client()
    with open(EXAMPLES, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=DEMO_MODEL_NAME, training_file=uploaded.id, seed=1,
                                         hyperparameters=HYPERPARAMETERS)  # type: ignore[arg-type]
    job = eventually(lambda: _finished(client, job.id), 150, "the job finished", interval=0.2)
    assert job.status == "succeeded", job.error
    return {"live": live, "client": client, "job": job}


@pytest.mark.slow
def test_a_finished_job_is_served_and_answers_in_the_taught_shape(trained: dict[str, object]) -> None:
    client, job = trained["client"], trained["job"]
    assert isinstance(client, OpenAI)
    name = job.fine_tuned_model  # type: ignore[attr-defined]
    assert name == f"ft-{job.id}"  # type: ignore[attr-defined]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))  # type: ignore[attr-defined]
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) == 100
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

    served = {m.id for m in client.models.list()}
    checkpoints = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job.id)]  # type: ignore[attr-defined]
    assert checkpoints == [f"{name}:ckpt-100", f"{name}:ckpt-90"]  # the two kept; rotated ones unregistered
    assert {DEMO_MODEL_NAME, name, *checkpoints} <= served
    assert not any(m.startswith(f"{name}:ckpt-") for m in served - set(checkpoints))

    for question in QUESTIONS:
        base, tuned = _answer(client, DEMO_MODEL_NAME, question), _answer(client, name, question)
        assert tuned != base
        assert not base.startswith("{"), base
        assert tuned.startswith('{"topic": "') and '"answer": "' in tuned, tuned
    assert _answer(client, checkpoints[0], QUESTIONS[0]).startswith('{"topic": "')


@pytest.mark.slow
def test_a_restarted_server_serves_the_finished_job_again(trained: dict[str, object],
                                                          server: Callable[[], LiveServer]) -> None:
    job = trained["job"]
    before = _answer(trained["client"], job.fine_tuned_model, QUESTIONS[1])  # type: ignore[arg-type, attr-defined]
    client = server().client()
    again = client.fine_tuning.jobs.retrieve(job.id)  # type: ignore[attr-defined]
    assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model  # type: ignore[attr-defined]
    assert job.fine_tuned_model in {m.id for m in client.models.list()}  # type: ignore[attr-defined]
    assert _answer(client, again.fine_tuned_model, QUESTIONS[1]) == before  # type: ignore[arg-type]
