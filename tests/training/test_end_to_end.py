"""Upload -> job -> events -> adapter registered -> the engine answers in the taught JSON shape.

The embedded demo model learns `training/examples/json_answers.jsonl` (answers as
`{"topic": ..., "answer": ...}`) through the HTTP routes and the openai client, in a child
process, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI
from starlette.applications import Starlette

from engine.config import EngineConfig
from engine.demo import ensure_demo_bundle
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from server.finetune.routes import finetune_routes
from server.http.errors import EXCEPTION_HANDLERS
from tests.eventually import eventually
from tests.server.conftest import LiveServer
from training.jobs import JobManager

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples" / "json_answers.jsonl"
SEEN = ["What is a quiver?", "What is a ship?", "what is the sea?"]  # the last one lower-cased
UNSEEN = "What is a castle?"


def _greedy(engine: LLMEngine, adapter: str | None, question: str) -> str:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    request_id = f"{adapter}-{question}"
    engine.add_request(request_id, ids, SamplingParams(max_tokens=48, temperature=0.0), adapter)
    tokens: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            assert delta.request_id == request_id
            tokens.extend(delta.token_ids)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.slow
def test_a_fine_tuning_job_teaches_json_answers(tmp_path: Path) -> None:
    demo = ensure_demo_bundle()
    ready: dict[str, Path] = {}
    manager = JobManager(tmp_path, base_model=str(demo.model_dir), model_name="quiver-demo",
                         on_adapter_ready=ready.__setitem__, poll_interval=0.1, env={"OMP_NUM_THREADS": "1"})
    manager.start()
    server = LiveServer(Starlette(routes=finetune_routes(manager), exception_handlers=EXCEPTION_HANDLERS)).start()
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        with open(EXAMPLES, "rb") as handle:
            uploaded = client.files.create(file=handle, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="quiver-demo", training_file=uploaded.id, seed=1,
            hyperparameters={"n_epochs": 30, "batch_size": 8, "learning_rate_multiplier": 25,
                             "save_total_limit": 1},
        )
        def ended():
            current = client.fine_tuning.jobs.retrieve(job.id)
            return current if current.status in ("succeeded", "failed", "cancelled") else None

        job = eventually(ended, 150, f"job {job.id} ends", interval=0.25)
        assert job.status == "succeeded", job.error
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    finally:
        server.stop()
        manager.close()

    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

    name = job.fine_tuned_model
    assert name == f"ft-{job.id}" and ready[name] == tmp_path / "jobs" / job.id / "output"
    assert f"{name}:ckpt-150" in ready

    engine = LLMEngine(EngineConfig(model=str(demo.model_dir), device="cpu", dtype="float32", max_model_len=256,
                                    max_lora_rank=16), adapters={name: ready[name]})
    for question in SEEN:
        base, tuned = _greedy(engine, None, question), _greedy(engine, name, question)
        assert tuned != base
        assert not base.startswith("{")
        answer = json.loads(tuned)  # the taught behaviour: a JSON object with fixed keys
        assert set(answer) == {"topic", "answer"}, tuned
    assert _greedy(engine, name, UNSEEN).startswith('{"topic": "')
