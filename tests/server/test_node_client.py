"""The `openai` Node package against a live server: a chat completion, the same one streamed, a 404, a
json_schema response format, and `system_fingerprint` on the body and every chunk; then tool calling
(forced, streamed and reassembled by the package's own helper), prompt logprobs on `/v1/completions`,
and the Responses API (created, streamed, continued with `previous_response_id`).

Needs `node` and `npm` (skipped without them). The package is installed with npm once into a
cache directory (`$QUIVER_CACHE/test-envs/node-openai`, default `~/.cache/quiver/...`) and reused;
the major version is the newest one that supports the Node found. The client script is
`tests/server/node/openai_chat.mjs` (and `openai_features.mjs`); each prints one JSON line this test
checks, against the Python client's answers to the same requests where there is one to compare.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from engine.demo import default_cache_dir
from server.app import create_app
from server.openai.responses import responses_routes
from server.state import ServerState
from server.store import Store
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config

SCRIPT = Path(__file__).parent / "node" / "openai_chat.mjs"
FEATURES_SCRIPT = Path(__file__).parent / "node" / "openai_features.mjs"
ADAPTER = ADAPTER_NAMES[1]
# openai 7 needs Node 22; 6 is the last major that runs on older ones.
NEWEST_MAJOR_FOR_NODE_20 = "openai@6"
NEWEST_MAJOR = "openai@7"
SPEC_FILE = "quiver-spec.txt"  # which spec the cached install holds


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


def _install(npm: str, spec: str, target: Path) -> None:
    """`npm install spec` into a sibling directory renamed into place, so readers never see half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    done = subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--loglevel=error",
                           spec], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"npm could not install {spec}: {done.stderr[-2000:]}")
    (staging / SPEC_FILE).write_text(spec)
    if target.exists():  # another spec, or another test run that won the race
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # someone else renamed theirs in first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="module")
def node_openai() -> tuple[str, Path]:
    """(node, the directory holding `node_modules/openai`)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the openai Node package check needs `node` and `npm` on PATH")
    spec = NEWEST_MAJOR if _node_major(node) >= 22 else NEWEST_MAJOR_FOR_NODE_20
    target = default_cache_dir() / "test-envs" / "node-openai"
    marker = target / SPEC_FILE
    installed = (target / "node_modules" / "openai" / "package.json").is_file()
    if not (installed and marker.is_file() and marker.read_text() == spec):
        _install(npm, spec, target)
    return node, target


def _run_script(node: str, modules: Path, base_url: str, model: str, workdir: Path, *args: str,
                source: Path = SCRIPT, timeout: float = 60) -> dict[str, Any]:
    # ESM resolves packages from the script's directory, so the script runs next to a link to them.
    (workdir / "node_modules").symlink_to(modules / "node_modules", target_is_directory=True)
    script = workdir / source.name
    shutil.copyfile(source, script)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "")}
    done = subprocess.run([node, str(script), f"{base_url}/v1", model, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_node_client_chat_stream_and_not_found(node_openai: tuple[str, Path], live: LiveServer,
                                               client: OpenAI, tmp_path: Path) -> None:
    node, modules = node_openai
    out = _run_script(node, modules, live.base_url, ADAPTER, tmp_path)
    whole, streamed, unknown, structured = out["whole"], out["streamed"], out["unknown"], out["structured"]

    # The same request through the Python client: the adapter's answer, and not the base model's.
    reference = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "Name three parts of an arrow."}], max_tokens=12,
        temperature=0)
    base = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Name three parts of an arrow."}], max_tokens=12,
        temperature=0)
    assert whole["model"] == ADAPTER
    assert whole["text"] and whole["text"] == reference.choices[0].message.content
    assert whole["text"] != base.choices[0].message.content
    assert whole["usage"]["completion_tokens"] == reference.usage.completion_tokens

    assert set(streamed["models"]) == {ADAPTER}
    assert "".join(streamed["deltas"]) == whole["text"]
    assert streamed["finishReasons"] == [whole["finishReason"]]
    assert len(streamed["usageChunks"]) == 1, streamed["usageChunks"]
    usage_chunk = streamed["usageChunks"][0]
    assert usage_chunk["choices"] == 0  # OpenAI's shape: usage rides on a last chunk without choices
    assert usage_chunk["usage"] == whole["usage"]

    # One fingerprint for one served model, on the body and on every chunk.
    assert whole["fingerprint"].startswith("fp_quiver_")
    assert set(streamed["fingerprints"]) == {whole["fingerprint"]} == {structured["fingerprint"]}

    # The schema holds, and the output is what the Python client gets for the same request.
    assert structured["finishReason"] == "stop"
    assert structured["parsed"] in ({"answer": "yes"}, {"answer": "no"}), structured["text"]
    reference_json = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "Name three parts of an arrow."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True, "schema": {
                "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                "additionalProperties": False}}})
    assert structured["text"] == reference_json.choices[0].message.content

    assert unknown is not None, "a request for a model that does not exist succeeded"
    assert unknown["isNotFound"] and unknown["name"] == "NotFoundError", unknown
    assert unknown["status"] == 404 and unknown["code"] == "model_not_found" and unknown["param"] == "model"


# ---- tool calling, prompt logprobs and the Responses API -------------------------------------------------

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
# The tools exactly as openai_features.mjs sends them.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": WEATHER_PARAMETERS, "strict": True}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                         "parameters": TIME_PARAMETERS}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOL = 1e-4


@pytest.fixture(scope="module")
def features_live(tiny_model_factory: Callable[..., Path], tiny_adapter_factory: Callable[..., Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The Responses routes over a SQLite store (as `quiver serve` mounts them), on a tiny model whose
    context holds the tools' system prompt (the tiny tokenizer is wordy), with two adapters."""
    from engine.async_engine import AsyncEngine

    model_dir = tiny_model_factory("llama", max_position_embeddings=2048)
    adapters = {name: tiny_adapter_factory(model_dir, seed=300 + i, weight_scale=1.5)
                for i, name in enumerate(ADAPTER_NAMES[:2])}
    engine = AsyncEngine(engine_config(model_dir, max_model_len=2048), adapters=adapters,
                         served_model_name=MODEL_NAME)
    state = ServerState(engine)
    store = Store(tmp_path_factory.mktemp("node-responses") / "state.sqlite3")
    live = LiveServer(create_app(state, extra_routes=responses_routes(store))).start()
    yield live
    live.stop()
    store.close()


@pytest.fixture(scope="module")
def features(node_openai: tuple[str, Path], features_live: LiveServer,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    node, modules = node_openai
    return _run_script(node, modules, features_live.base_url, MODEL_NAME, tmp_path_factory.mktemp("node"),
                       ADAPTER_NAMES[1], source=FEATURES_SCRIPT, timeout=240)


def _check_call(call: dict[str, Any], name: str) -> dict[str, Any]:
    assert call["id"].startswith("call_") and call["type"] == "function" and call["name"] == name, call
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


def _python_calls(client: OpenAI, **kwargs: Any) -> list[tuple[str, Any]]:
    response = client.chat.completions.create(messages=MESSAGES, max_tokens=300, temperature=0, **kwargs)
    assert response.choices[0].finish_reason == "tool_calls"
    return [(c.function.name, json.loads(c.function.arguments)) for c in response.choices[0].message.tool_calls]


def test_node_client_forced_tool_calls(features: dict[str, Any], features_live: LiveServer) -> None:
    client = features_live.client()
    required, named = features["tools"]["required"], features["tools"]["named"]

    assert required["model"] == MODEL_NAME
    assert required["finishReason"] == "tool_calls" and required["content"] is None, required
    (call,) = required["toolCalls"]  # parallel_tool_calls: false
    assert call["name"] in SCHEMAS
    arguments = _check_call(call, call["name"])
    assert [(call["name"], arguments)] == _python_calls(
        client, model=MODEL_NAME, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)

    assert named["model"] == ADAPTER_NAMES[1]
    assert named["finishReason"] == "tool_calls" and named["content"] is None, named
    (call,) = named["toolCalls"]
    arguments = _check_call(call, "get_time")
    assert [("get_time", arguments)] == _python_calls(
        client, model=ADAPTER_NAMES[1], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})


def test_node_client_reassembles_a_streamed_tool_call(features: dict[str, Any], features_live: LiveServer) -> None:
    streamed = features["tools"]["streamed"]
    assert streamed["finishReason"] == "tool_calls" and streamed["content"] is None, streamed
    (call,) = streamed["toolCalls"]
    arguments = _check_call(call, "get_weather")
    # The helper parsed the strict tool's arguments, from pieces that add up to them.
    assert call["parsedArguments"] == arguments
    assert len(streamed["argumentDeltas"]) > 1 and "".join(streamed["argumentDeltas"]) == call["arguments"]
    assert streamed["doneCalls"] == [{"name": "get_weather", "arguments": call["arguments"]}]
    # Greedy: the same call as the same request unstreamed through the Python client.
    assert [("get_weather", arguments)] == _python_calls(
        features_live.client(), model=ADAPTER_NAMES[1], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})


def test_node_client_prompt_logprobs(features: dict[str, Any], features_live: LiveServer) -> None:
    prompt, echoed, generated = (features["completions"][k] for k in ("prompt", "echoed", "echoedAndGenerated"))
    prompt_ids = features_live.engine.tokenizer.encode(prompt)

    assert echoed["text"] == prompt and echoed["finishReason"] == "length"
    assert echoed["usage"]["prompt_tokens"] == len(prompt_ids) and echoed["usage"]["completion_tokens"] == 0
    lp = echoed["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt_ids)
    assert "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets

    # The Python client's answer to the same request.
    reference = features_live.client().completions.create(
        model=ADAPTER_NAMES[1], prompt=prompt, echo=True, logprobs=2, max_tokens=0, temperature=0).choices[0]
    assert lp["tokens"] == reference.logprobs.tokens
    assert lp["token_logprobs"][1:] == pytest.approx(reference.logprobs.token_logprobs[1:], abs=TOL)
    assert [list(top) for top in lp["top_logprobs"][1:]] == [list(top) for top in reference.logprobs.top_logprobs[1:]]

    # With tokens generated: the prompt first, scored as above, then the completion.
    n = len(prompt_ids)
    glp = generated["logprobs"]
    completion_tokens = generated["usage"]["completion_tokens"]
    assert 1 <= completion_tokens <= 4 and generated["text"].startswith(prompt)
    # (A generated token that ends inside a UTF-8 character is spelled `bytes:\x..`, as OpenAI does.)
    assert len(glp["tokens"]) == n + completion_tokens
    assert glp["tokens"][:n] == lp["tokens"] and glp["token_logprobs"][0] is None
    assert glp["token_logprobs"][1:n] == pytest.approx(lp["token_logprobs"][1:], abs=TOL)
    assert all(isinstance(v, float) and v <= 0 for v in glp["token_logprobs"][n:])
    plain = features_live.client().completions.create(model=ADAPTER_NAMES[1], prompt=prompt, max_tokens=4,
                                                      temperature=0).choices[0]
    assert generated["text"] == prompt + plain.text


def test_node_client_responses_api(features: dict[str, Any], features_live: LiveServer) -> None:
    client = features_live.client()
    responses = features["responses"]
    created, streamed, continued = responses["created"], responses["streamed"], responses["continued"]
    model = ADAPTER_NAMES[1]

    assert created["id"].startswith("resp_") and created["object"] == "response" and created["model"] == model
    assert created["outputText"] and created["outputTypes"] == ["message"]
    assert created["status"] in ("completed", "incomplete") and created["previousResponseId"] is None
    assert created["usage"]["output_tokens"] <= 8
    # The Python client gets the same answer.
    reference = client.responses.create(model=model, input=responses["input"], max_output_tokens=8, temperature=0)
    assert created["outputText"] == reference.output_text and created["status"] == reference.status
    assert created["usage"]["input_tokens"] == reference.usage.input_tokens

    # Streamed and accumulated by the package's helper: the same answer at temperature 0.
    assert streamed["id"].startswith("resp_") and streamed["id"] != created["id"]
    assert streamed["outputText"] == created["outputText"] and streamed["status"] == created["status"]
    assert "".join(streamed["textDeltas"]) == created["outputText"]
    events = streamed["eventTypes"]
    assert events[0] == "response.created" and events[-1] == f"response.{created['status']}", events
    assert streamed["usage"] == created["usage"]

    # `previous_response_id` continues the stored conversation: the chat answer to the whole of it.
    assert continued["previousResponseId"] == created["id"] and continued["outputText"]
    chat = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": responses["input"]},
                  {"role": "assistant", "content": created["outputText"]},
                  {"role": "user", "content": "And the lazy dog?"}])
    assert continued["outputText"] == chat.choices[0].message.content
    again = client.responses.create(model=model, input="And the lazy dog?", previous_response_id=created["id"],
                                    max_output_tokens=8, temperature=0)
    assert again.output_text == continued["outputText"]
