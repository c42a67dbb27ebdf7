"""The `openai` Node package against a live server: a chat completion, the same one streamed, a 404, a
json_schema response format, and `system_fingerprint` on the body and every chunk.

Needs `node` and `npm` (skipped without them). The package is installed with npm once into a
cache directory (`$QUIVER_CACHE/test-envs/node-openai`, default `~/.cache/quiver/...`) and reused;
the major version is the newest one that supports the Node found. The client script is
`tests/server/node/openai_chat.mjs`; it prints one JSON line this test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from engine.demo import default_cache_dir
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer

SCRIPT = Path(__file__).parent / "node" / "openai_chat.mjs"
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


def _run_script(node: str, modules: Path, base_url: str, model: str, workdir: Path) -> dict[str, Any]:
    # ESM resolves packages from the script's directory, so the script runs next to a link to them.
    (workdir / "node_modules").symlink_to(modules / "node_modules", target_is_directory=True)
    script = workdir / SCRIPT.name
    shutil.copyfile(SCRIPT, script)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "")}
    done = subprocess.run([node, str(script), f"{base_url}/v1", model], capture_output=True, text=True, timeout=60,
                          env=env, cwd=workdir)
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
