"""The `seekrai` SDK, unchanged but for its base URL, against a live `quiver serve` on the CPU.

The SDK pins older versions of packages this project uses (httpx below 0.28, typer, filelock), so
where the test environment lacks it, it gets a virtual environment of its own, made once and cached
(QUIVER_SEEKRAI_PYTHON names an interpreter that has it instead); the client runs in a subprocess. The flow: create a project ->
upload the example file -> fine-tune -> poll -> loss events -> create a deployment -> promote;
then the server restarts, and everything is still there: the project and its run, the file, the
fine-tune and its events, the deployment promoted again; a streamed chat completion with
`logprobs=True, top_logprobs=5` -> `top_logprobs=21` is refused with the SDK's own error -> demote;
a last restart keeps the demotion and the token counts.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.demo import default_cache_dir, ensure_demo_bundle
from tests.eventually import eventually
from tests.server.helpers import wait_until_serving

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "training" / "examples" / "json_answers.jsonl"

# Run by the seekrai interpreter after the text of tests/eventually.py, whose `eventually` it polls with.
CLIENT = r'''
import json, sys
from seekrai import SeekrFlow
from seekrai.error import InvalidRequestError
from seekrai.types import InfrastructureConfig, LoRAConfig, TrainingConfig

phase, base_url, data_file, state_file = sys.argv[1:5]
client = SeekrFlow(api_key="unused", base_url=base_url)
state = json.load(open(state_file)) if phase != "train" else {}
out = {}

def events(ft_id):
    return [e.model_dump(mode="json") for e in client.fine_tuning.list_events(ft_id).data]

if phase == "train":
    project = client.projects.create(name="json answers", description="Teach the demo model to answer in JSON.")
    upload = client.files.upload(data_file, purpose="fine-tune")
    config = TrainingConfig(training_files=[upload.id], model="quiver-demo", n_epochs=6, batch_size=4,
                            learning_rate=5e-3, experiment_name="json",
                            lora_config=LoRAConfig(r=16, alpha=32, dropout=0.0))
    ft = client.fine_tuning.create(project_id=project.id, training_config=config,
                                   infrastructure_config=InfrastructureConfig(accel_type="H100", n_accel=1))
    out["created_status"] = ft.status.value
    seen = [ft.status.value]

    def finished(ft_id=ft.id):
        ft = client.fine_tuning.retrieve(ft_id)
        seen.append(ft.status.value)
        return ft if ft.status.value in ("completed", "failed", "cancelled") else None

    ft = eventually(finished, 120, "the fine-tune finished", interval=0.3)
    out.update(statuses=seen, fine_tune=ft.model_dump(mode="json"), events=events(ft.id))
    # SeekrFlow's loss-plot snippet, as its documentation writes it (less the plotting library).
    events = client.fine_tuning.list_events(ft.id).data
    sorted_events = sorted(events, key=lambda x: x.epoch)
    out["plotted"] = {"epochs": [e.epoch for e in sorted_events], "losses": [e.loss for e in sorted_events]}
    deployment = client.deployments.create(name="json answers v1", description="The JSON fine-tune.",
                                           model_type="Fine-tuned Run", model_id=ft.id, n_instances=1)
    out["created_deployment"] = deployment.model_dump(mode="json")
    out["promoted"] = client.deployments.promote(deployment.id).model_dump(mode="json")
    out.update(project=project.model_dump(mode="json"), file=upload.model_dump(mode="json"))
elif phase == "serve":
    ft_id, dep_id = state["fine_tune"]["id"], state["promoted"]["id"]
    out["projects"] = [p.model_dump(mode="json") for p in client.projects.list().data]
    out["project"] = client.projects.retrieve(state["project"]["id"]).model_dump(mode="json")
    out["file"] = client.files.retrieve(state["file"]["id"]).model_dump(mode="json")
    out["fine_tune"] = client.fine_tuning.retrieve(ft_id).model_dump(mode="json")
    out["fine_tunes"] = [f.id for f in client.fine_tuning.list().data]
    out["events"] = events(ft_id)
    out["deployment"] = client.deployments.retrieve(dep_id).model_dump(mode="json")
    out["deployments"] = [d.id for d in client.deployments.list().data]
    out["models"] = [m.id for m in client.models.list().data]
    stream = client.chat.completions.create(model=dep_id, messages=[{"role": "user", "content": "What is a ship?"}],
                                            stream=True, logprobs=True, top_logprobs=5, max_tokens=24, temperature=0)
    out["chunks"] = [c.model_dump(mode="json") for c in stream]
    whole = client.chat.completions.create(model=ft_id, messages=[{"role": "user", "content": "What is a ship?"}],
                                           logprobs=True, top_logprobs=2, max_tokens=12, temperature=0)
    out["whole"] = whole.model_dump(mode="json")
    base = client.chat.completions.create(model="quiver-demo", messages=[{"role": "user", "content": "What is a ship?"}],
                                          max_tokens=24, temperature=0)
    out["base_text"] = base.choices[0].message.content
    try:
        client.chat.completions.create(model=dep_id, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=21)
        out["over_limit"] = None
    except InvalidRequestError as exc:
        out["over_limit"] = {"type": type(exc).__name__, "status": exc.http_status, "message": str(exc)}
    out["demoted"] = client.deployments.demote(dep_id).model_dump(mode="json")
    try:
        client.chat.completions.create(model=dep_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        out["inactive"] = None
    except InvalidRequestError as exc:
        out["inactive"] = str(exc)
elif phase == "check":
    out["deployment"] = client.deployments.retrieve(state["promoted"]["id"]).model_dump(mode="json")
    out["fine_tune"] = client.fine_tuning.retrieve(state["fine_tune"]["id"]).model_dump(mode="json")
print(json.dumps(out))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _has_seekrai(python: str) -> bool:
    if not Path(python).is_file():
        return False
    return subprocess.run([python, "-c", "import seekrai"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def seekrai_python() -> str:
    """An interpreter with the `seekrai` package, in an environment of its own (installed on first use)."""
    given = os.environ.get("QUIVER_SEEKRAI_PYTHON")
    if given:
        assert _has_seekrai(given), f"QUIVER_SEEKRAI_PYTHON={given} cannot import seekrai"
        return given
    if _has_seekrai(sys.executable):  # installed by hand into this environment
        return sys.executable
    venv = default_cache_dir() / "test-envs" / "seekrai"
    python = str(venv / "bin" / "python")
    if not _has_seekrai(python):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        install = subprocess.run([python, "-m", "pip", "install", "--quiet", "seekrai"], capture_output=True,
                                 text=True, timeout=600)
        if install.returncode != 0:
            pytest.skip(f"could not install seekrai into {venv}: {install.stderr[-2000:]}")
    return python


class _Server:
    """`python -m server serve` in a child process, on the demo model, with its state in `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--jobs-dir",
                   str(self.home / "jobs"), "--state-db", str(self.home / "state.sqlite3"), "--max-model-len", "512",
                   "--max-num-seqs", "8", "--max-loras", "4", "--max-lora-rank", "16", "--log-format", "text",
                   "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - the child owns it while it runs
        self._proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until_serving(self.base_url, self._proc, 90, self.log)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def log(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    ensure_demo_bundle()  # built (once) here, not inside the first server's start-up deadline
    live = _Server(tmp_path_factory.mktemp("quiver-home"))
    live.start()
    yield live
    live.stop()


def _run(python: str, phase: str, server: _Server, tmp_path: Path, state: dict[str, Any]) -> dict[str, Any]:
    script, state_file = tmp_path / "flow.py", tmp_path / f"{phase}-state.json"
    script.write_text((REPO / "tests" / "eventually.py").read_text() + CLIENT)
    state_file.write_text(json.dumps(state))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "SEEKR_DISABLE_TQDM": "1"}
    done = subprocess.run([python, str(script), phase, server.base_url, str(EXAMPLES), str(state_file)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nserver log:\n{server.log()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_seekrai_sdk_flow_survives_restarts(seekrai_python: str, server: _Server, tmp_path: Path) -> None:
    trained = _run(seekrai_python, "train", server, tmp_path, {})
    ft = trained["fine_tune"]
    assert trained["created_status"] in ("pending", "queued", "running")
    assert ft["status"] == "completed" and ft["inference_available"], ft
    assert "running" in trained["statuses"] and ft["project_id"] == trained["project"]["id"]
    assert ft["fine_tuned_model"] == f"ft-{ft['id']}" and ft["n_epochs"] == 6 and ft["batch_size"] == 4
    assert ft["accel_type"] == "H100" and ft["learning_rate"] == 5e-3 and ft["experiment_name"] == "json"
    assert (ft["lora_config"]["r"], ft["lora_config"]["alpha"], ft["lora_config"]["dropout"]) == (16, 32, 0.0)
    # Only loss points are listed (SeekrFlow's events carry no messages), each with its epoch.
    losses = [e["loss"] for e in trained["events"]]
    assert len(losses) == 60 and [e["step"] for e in trained["events"]] == list(range(1, 61))
    assert trained["plotted"] == {"epochs": [e["epoch"] for e in trained["events"]], "losses": losses}
    assert trained["plotted"]["epochs"][-1] == 6.0 and None not in losses
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert all(e["object"] == "fine-tune-event" and e["created_at"] for e in trained["events"])
    assert trained["created_deployment"]["status"] == "Inactive"
    assert trained["promoted"]["status"] == "Active" and trained["promoted"]["last_deployed_at"]

    server.stop()
    server.start()
    served = _run(seekrai_python, "serve", server, tmp_path, trained)
    # Nothing was lost in the restart.
    same = ("id", "name", "description", "created_at")
    assert {k: served["project"][k] for k in same} == {k: trained["project"][k] for k in same}
    assert served["project"]["updated_at"] >= trained["project"]["updated_at"]  # the fine-tune touched it
    assert [(p["id"], p["runs"], p["runs_deployed"]) for p in served["projects"]] == [(trained["project"]["id"], 1, 1)]
    assert served["file"] == trained["file"] and served["file"]["bytes"] == EXAMPLES.stat().st_size
    assert served["fine_tune"] == ft and served["fine_tunes"] == [ft["id"]]
    assert served["events"] == trained["events"]
    assert served["deployment"]["status"] == "Active", served["deployment"]  # promoted again by the new server
    assert served["deployments"] == [trained["promoted"]["id"]]
    assert {"quiver-demo", ft["fine_tuned_model"]} <= set(served["models"])

    chunks = served["chunks"]
    with_tokens = [c for c in chunks if c["choices"][0]["logprobs"]]
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
    assert text.startswith("{") and text != served["base_text"], (text, served["base_text"])  # the taught shape
    assert chunks[-1]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["completion_tokens"] == len(with_tokens)
    offset = 0
    for chunk in with_tokens:
        logprobs = chunk["choices"][0]["logprobs"]
        assert len(logprobs["top_logprobs"]) == 5 and logprobs["text_offset"] == offset
        assert logprobs["token_logprob"] == logprobs["content"][0]["logprob"] <= 0
        assert logprobs["token_logprob"] <= max(logprobs["top_logprobs"].values()) + 1e-6
        assert len(logprobs["content"]) == 1 and len(logprobs["content"][0]["top_logprobs"]) == 5
        offset += len(logprobs["token"])
    whole = served["whole"]["choices"][0]
    logprobs, used = whole["logprobs"], served["whole"]["usage"]["completion_tokens"]
    assert whole["message"]["content"].startswith("{") and served["whole"]["model"] == ft["id"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["content"]) == used
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert [c["logprob"] for c in logprobs["content"]] == logprobs["token_logprobs"]
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(used)]
    assert served["over_limit"]["type"] == "InvalidRequestError" and served["over_limit"]["status"] == 400
    assert "top_logprobs" in served["over_limit"]["message"]
    assert served["demoted"]["status"] == "Inactive"
    assert "not active" in served["inactive"]

    server.stop()
    server.start()
    checked = _run(seekrai_python, "check", server, tmp_path, trained)
    assert checked["deployment"]["status"] == "Inactive"
    # Both answers the promoted deployment's adapter gave count, whichever name the request used.
    assert checked["deployment"]["total_output_tokens"] == len(with_tokens) + used
    assert checked["deployment"]["total_input_tokens"] == chunks[-1]["usage"]["prompt_tokens"] * 2
    assert checked["fine_tune"] == ft


PLOT_SNIPPET = r'''
import json, sys
from seekrai.types import FinetuneListEvents

events = FinetuneListEvents(**json.load(sys.stdin)).data
# SeekrFlow's loss-plot snippet, as its documentation writes it (less the plotting library).
sorted_events = sorted(events, key=lambda x: x.epoch)
epochs = [e.epoch for e in sorted_events]
losses = [e.loss for e in sorted_events]
print(json.dumps({"epochs": epochs, "losses": losses}))
'''


def test_the_seekrflow_loss_plot_snippet_reads_a_finished_jobs_events(
        seekrai_python: str, tiny_model_factory: Any, tmp_path: Path) -> None:
    from server.seekrflow import shapes as shapes
    from training.jobs import JobManager

    manager = JobManager(tmp_path, base_model=str(tiny_model_factory("llama")), model_name="tiny",
                         poll_interval=0.05, train_args=["--device", "cpu"], env={"OMP_NUM_THREADS": "1"})
    manager.start()
    try:
        row = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
        upload = manager.files.add("train.jsonl", io.BytesIO(f"{row}\n".encode() * 8), "fine-tune")
        job = manager.create_job(model="tiny", training_file=upload.id,
                                 hyperparameters={"n_epochs": 2, "batch_size": 4, "save_total_limit": 0})
        ended = eventually(lambda: (j := manager.get_job(job["id"]))["status"] in ("succeeded", "failed", "cancelled")
                           and j, 90, "the job finished", interval=0.05)
        assert ended["status"] == "succeeded", ended["error"]
        newest_first, _ = manager.list_events(job["id"], None, 1000)
    finally:
        manager.close()
    oldest_first = list(reversed(newest_first))
    assert {e["type"] for e in oldest_first} == {"message", "metrics"}  # status messages among the losses

    body = {"object": "list", "data": shapes.fine_tune_events(oldest_first)}  # what the events route answers
    done = subprocess.run([seekrai_python, "-c", PLOT_SNIPPET], input=json.dumps(body), capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr[-4000:]
    plotted = json.loads(done.stdout)
    metrics = [e["data"] for e in oldest_first if e["type"] == "metrics"]
    assert plotted == {"epochs": [0.5, 1.0, 1.5, 2.0], "losses": [m["train_loss"] for m in metrics]}
