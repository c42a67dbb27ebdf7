"""What the fuzz tests share: a server mounting every route `quiver serve` does, the ids of things
that exist on it, its operations as schemathesis reads them from /openapi.json, and the checks every
response must pass. The fixtures over these live in `conftest.py` (`fuzz_live`, `known`,
`operations`), one server per test module.

Valid requests sometimes get the ids of things that exist (adapters, a file, a job, a project, a
deployment) in place of random ones, so the handlers' work past "not found" is exercised too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

from adapters.config import AdapterConfig
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.state import ServerState
from server.wiring import build_stateful
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
ROOT_ADAPTERS = ["root-a", "root-b"]  # sources the register route can find under the adapter root
TRAINING_LINE = json.dumps({"messages": [{"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": "Hi there."}]})
GENERATION = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/inference/chat/completions",
              "POST /v1/responses"]
ERROR_KEYS = {"message", "type", "param", "code"}

# Which cases each operation is fuzzed with. In order: deleting adapters comes after the routes
# that use them.
BOTH, VALID = (POSITIVE, NEGATIVE), (POSITIVE,)  # VALID: nothing to make invalid (any string is a valid id)
OPENAI = {"GET /health": VALID, "GET /ready": VALID, "GET /v1/models": VALID, "GET /v1/models/{model}": VALID, **dict.fromkeys(GENERATION, BOTH)}
ADMIN = {"GET /v1/adapters": VALID, "POST /v1/adapters": BOTH, "GET /v1/adapters/{name}": BOTH,
         "POST /v1/adapters/{name}/promote": BOTH, "POST /v1/adapters/{name}/demote": BOTH,
         "DELETE /v1/adapters/{name}": BOTH}
FINE_TUNING = {"POST /v1/files": BOTH, "GET /v1/files": VALID, "GET /v1/files/{file_id}": VALID,
               "POST /v1/fine_tuning/jobs": BOTH, "GET /v1/fine_tuning/jobs": BOTH,
               "GET /v1/fine_tuning/jobs/{job_id}": VALID, "GET /v1/fine_tuning/jobs/{job_id}/events": BOTH,
               "GET /v1/fine_tuning/jobs/{job_id}/checkpoints": BOTH, "POST /v1/fine_tuning/jobs/{job_id}/cancel": VALID}
FLOW = {"POST /v1/flow/projects": BOTH, "GET /v1/flow/projects": BOTH, "GET /v1/flow/projects/{project_id}": BOTH,
        "PUT /v1/flow/files": BOTH, "POST /v1/flow/files": BOTH, "GET /v1/flow/files": BOTH,
        "GET /v1/flow/files/{file_id}": VALID, "POST /v1/flow/fine-tune": BOTH, "GET /v1/flow/fine-tunes": VALID,
        "GET /v1/flow/fine-tunes/{job_id}": VALID, "GET /v1/flow/fine-tunes/{job_id}/events": VALID,
        "PUT /v1/flow/fine-tunes/{job_id}/cancel": VALID, "POST /v1/flow/fine-tunes/{job_id}/cancel": VALID,
        "POST /v1/flow/deployments": BOTH, "GET /v1/flow/deployments": BOTH,
        "GET /v1/flow/deployments/{deployment_id}": VALID, "PUT /v1/flow/deployments/{deployment_id}/promote": VALID,
        "POST /v1/flow/deployments/{deployment_id}/promote": VALID,
        "PUT /v1/flow/deployments/{deployment_id}/demote": VALID,
        "POST /v1/flow/deployments/{deployment_id}/demote": VALID, "GET /v1/flow/models": VALID}
RESPONSES = {"GET /v1/responses/{response_id}": VALID, "GET /v1/responses/{response_id}/input_items": BOTH,
             "DELETE /v1/responses/{response_id}": VALID}
TOKENIZER = {"POST /tokenize": BOTH, "POST /detokenize": BOTH, "GET /version": VALID}
MODES: dict[str, tuple[GenerationMode, ...]] = {**OPENAI, **ADMIN, **FINE_TUNING, **FLOW, **RESPONSES, **TOKENIZER}


@dataclass
class Known:
    """Ids of things that exist on the fuzzed server, by path parameter name."""

    path: dict[str, list[Any]]
    file_id: str
    project_id: int
    job_id: str


def start_fuzz_server(server_model_dir: Path, server_adapters: dict[str, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    from engine.async_engine import AsyncEngine

    root = tmp_path_factory.mktemp("adapter-root")
    for name, source in zip(ROOT_ADAPTERS, ADAPTER_NAMES[:2], strict=True):
        shutil.copytree(server_adapters[source], root / name)
    # A short context keeps the valid requests hypothesis generates (n up to 128) cheap.
    engine = AsyncEngine(engine_config(server_model_dir, max_model_len=24, max_num_seqs=64),
                         adapters=server_adapters, served_model_name=MODEL_NAME,
                         adapter_config=AdapterConfig(adapter_root=root))
    state = ServerState(engine)
    # Jobs the fuzzer manages to create fail at once instead of training on the shared CPU.
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=tmp_path_factory.mktemp("jobs"),
                              base_model=str(server_model_dir), model_name=MODEL_NAME,
                              python=shutil.which("false") or "false", poll_interval=0.05)
    return LiveServer(create_app(state, stateful=stateful)).start()


def create_known(live: LiveServer) -> Known:
    """A file, a (failed) job, a project and a deployment to point valid requests at."""
    with live.http() as http:
        upload = http.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("train.jsonl", (TRAINING_LINE + "\n") * 2)})
        file_id = upload.raise_for_status().json()["id"]
        job = http.post("/v1/fine_tuning/jobs", json={"model": MODEL_NAME, "training_file": file_id})
        job_id = job.raise_for_status().json()["id"]
        project = http.post("/v1/flow/projects", json={"name": "fuzzed", "description": "made for the fuzzer"})
        project_id = project.raise_for_status().json()["id"]
        deployment = http.post("/v1/flow/deployments", json={
            "name": "fuzzed base", "description": "the base model", "model_type": "Base Model",
            "model_id": MODEL_NAME})
        deployment_id = deployment.raise_for_status().json()["id"]
        response = http.post("/v1/responses", json={"model": MODEL_NAME, "input": "Hello", "max_output_tokens": 2})
        response_id = response.raise_for_status().json()["id"]
    names = [*ADAPTER_NAMES[:3], ROOT_ADAPTERS[0]]
    return Known(path={"name": names, "model": [MODEL_NAME, *names], "file_id": [file_id], "job_id": [job_id],
                       "project_id": [project_id], "deployment_id": [deployment_id], "response_id": [response_id]},
                 file_id=file_id, project_id=project_id, job_id=job_id)


def load_operations(live: LiveServer) -> dict[str, Any]:
    """The server's operations by label ("POST /v1/completions"), read from its /openapi.json."""
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")
    return {result.ok().label: result.ok() for result in schema.get_all_operations()}


def _fill_bodies(label: str, body: dict[str, Any], known: Known, draw: Callable[[Any], Any]) -> None:
    """Point a valid body at things that exist, so the handler goes past its look-ups."""
    if label in ("POST /v1/files", "PUT /v1/flow/files", "POST /v1/flow/files"):
        body["file" if "file" in body else "files"] = TRAINING_LINE.encode() + b"\n"
    elif label == "POST /v1/adapters":
        body["source"] = draw(st.sampled_from(ROOT_ADAPTERS))
    elif label == "POST /v1/fine_tuning/jobs":
        body.update(model=MODEL_NAME, training_file=known.file_id)
    elif label == "POST /v1/flow/fine-tune":
        body["project_id"] = known.project_id
        if isinstance(body.get("training_config"), dict):
            body["training_config"].update(model=MODEL_NAME, training_files=[known.file_id])
    elif label == "POST /v1/flow/deployments":
        body["model_id"] = draw(st.sampled_from([MODEL_NAME, ADAPTER_NAMES[0], known.job_id]))
    elif label == "POST /v1/responses":
        body["model"] = draw(st.sampled_from([MODEL_NAME, ADAPTER_NAMES[0]]))
        if draw(st.booleans()):
            body["previous_response_id"] = known.path["response_id"][0]


@st.composite
def cases(draw: Callable[[Any], Any], operation: Any, mode: GenerationMode, known: Known,
          point_at_known: bool | None = None) -> Any:
    """A schemathesis case of `operation`; a valid one may be pointed at things that exist."""
    case = draw(operation.as_strategy(generation_mode=mode))
    if mode is POSITIVE and (draw(st.booleans()) if point_at_known is None else point_at_known):
        for key in list(case.path_parameters or {}):
            if key in known.path:
                case.path_parameters[key] = draw(st.sampled_from(known.path[key]))
        if isinstance(case.body, dict):
            _fill_bodies(operation.label, case.body, known, draw)
    return case


def assert_not_a_server_error(status: int, text: str, request: object) -> None:
    """Below 500, and every 4xx is OpenAI's error envelope (never starlette's or pydantic's 422)."""
    assert status < 500, (request, text)
    if status >= 400:
        assert status != 422, (request, text)
        error = json.loads(text)["error"]
        assert set(error) == ERROR_KEYS, (request, text)
        assert isinstance(error["message"], str) and isinstance(error["type"], str), (request, text)
