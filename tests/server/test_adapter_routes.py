"""The adapter admin routes on a live server: register, promote, demote and delete while traffic
runs (outputs checked, not only statuses), every bad-adapter case answered with its reason while
other adapters keep serving, path traversal refused, hub ids from a prepared offline cache."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.config import AdapterConfig
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.state import ServerState
from tests.adapters.lora_dirs import break_adapter, model_dims, one_torch_thread, write_lora_dir
from tests.adapters.test_sources import _hub_cache
from tests.eventually import eventually
from tests.server.conftest import MODEL_NAME, LiveServer, engine_config

GOOD = [f"good-{i}" for i in range(6)]
PROMPT = [11, 42, 7, 99, 23]
MAX_TOKENS = 6
# defect -> what the 400 must say
BAD = {
    "missing-config": "adapter_config.json is missing",
    "missing-weights": "adapter_model.safetensors is missing",
    "pickle": "pickle weights are refused",
    "corrupt": "corrupt or not a safetensors file",
    "shapes": "expected in_features",
    "rank": "exceeds the server's max_rank 16",
    "targets": "matches none of the supported modules",
    "base": "names a different model",
}


@dataclass
class Env:
    live: LiveServer
    http: httpx.Client
    root: Path
    outside: Path
    refs: dict[str | None, str]


def _complete(http: httpx.Client, model: str | None, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    body = {"model": model or MODEL_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    return http.post("/v1/completions", json=body)


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def env(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from engine.async_engine import AsyncEngine

    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside")
    dims = model_dims(server_model_dir)
    for i, name in enumerate(GOOD):
        write_lora_dir(root / name, dims, rank=(2, 4, 8)[i % 3], alpha=8.0, seed=700 + i, scale=1.5,
                       targets=("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "v_proj", "o_proj"))
    for defect in BAD:
        break_adapter((outside if defect == "missing-config" else root) / f"bad-{defect}", defect, dims)
    write_lora_dir(outside / "escapee", dims, seed=1)
    (root / "sneaky").symlink_to(outside / "escapee", target_is_directory=True)
    cache = tmp_path_factory.mktemp("hub-cache")
    _hub_cache(cache, "org/hub-ada", root / "good-5")
    engine = AsyncEngine(
        engine_config(server_model_dir, max_loras=3, max_lora_rank=16, max_model_len=64, max_num_seqs=16),
        adapters={"bad-missing-config": outside / "bad-missing-config"},
        served_model_name=MODEL_NAME,
        adapter_config=AdapterConfig(max_cpu_adapters=4, adapter_root=root, refuse_base_mismatch=True,
                                     hub_cache_dir=cache),
    )
    state = ServerState(engine)
    live = LiveServer(create_app(state, extra_routes=adapter_routes(state))).start()
    http = live.http()
    try:
        # Single-adapter references: each adapter alone on an idle server.
        refs = {name: _text(_complete(http, name)) for name in [None, *GOOD]}
        assert len(set(refs.values())) == len(refs), "every adapter must produce a distinct output"
        yield Env(live, http, root, outside, refs)
    finally:
        http.close()
        live.stop()


def _adapters(env: Env) -> dict[str, dict[str, Any]]:
    response = env.http.get("/v1/adapters")
    assert response.status_code == 200
    return {info["id"]: info for info in response.json()["data"]}


def _models(env: Env) -> set[str]:
    return {m["id"] for m in env.http.get("/v1/models").json()["data"]}


def test_listing_shows_every_root_adapter_and_matches_models(env: Env) -> None:
    infos = _adapters(env)
    assert set(GOOD) <= set(infos) and "bad-missing-config" in infos and "sneaky" not in infos
    assert _models(env) == set(infos) | {MODEL_NAME}
    used = infos["good-1"]
    assert used["rank"] == 4 and used["targets"] == ["q_proj", "v_proj"] and used["size_bytes"] > 0
    assert used["requests"] >= 1 and used["last_used"] is not None and used["in_flight"] == 0
    # Four host slots for six used adapters: the most recent is loaded, the first went back to disk.
    assert infos["good-5"]["state"] in ("host", "gpu") and infos["good-5"]["tier"] in ("host", "gpu")
    assert (infos["good-0"]["state"], infos["good-0"]["tier"]) == ("registered", "disk")
    assert infos["good-0"]["host_evictions"] == 1
    one = env.http.get("/v1/adapters/good-1").json()
    assert one["id"] == "good-1" and one["adapter_id"] == used["adapter_id"]
    assert env.http.get("/v1/adapters/nope").status_code == 404


def test_bad_adapters_get_400_with_the_reason_while_others_serve(env: Env) -> None:
    names = [f"bad-{defect}" for defect in BAD] + GOOD + [None]
    with ThreadPoolExecutor(8) as pool:
        responses = dict(zip(names, pool.map(lambda n: _complete(env.http, n), names), strict=True))
    for defect, reason in BAD.items():
        response = responses[f"bad-{defect}"]
        assert response.status_code == 400, (defect, response.text)
        error = response.json()["error"]
        assert reason in error["message"] and error["code"] == "adapter_failed", (defect, error)
        info = env.http.get(f"/v1/adapters/bad-{defect}").json()
        assert info["state"] == "failed" and reason in info["error"]
    for name in [*GOOD, None]:
        assert _text(responses[name]) == env.refs[name]
    again = _complete(env.http, "bad-corrupt")
    assert again.status_code == 400 and BAD["corrupt"] in again.text
    # Failed adapters leave /v1/models (clients discover what can serve) but stay in the admin list.
    failed = {f"bad-{defect}" for defect in BAD}
    assert not failed & _models(env) and set(GOOD) <= _models(env)
    assert failed <= set(_adapters(env))


@pytest.mark.parametrize("name", ["../escapee", "..", "/etc/passwd", "a/b", "%2e%2e", "sneaky",
                                  "../outside/escapee", "..%2Fescapee"])
def test_traversal_in_model_names_is_refused(env: Env, name: str) -> None:
    response = _complete(env.http, name)
    assert response.status_code == 404, response.text


@pytest.mark.parametrize("path", ["/v1/adapters/..", "/v1/adapters/%2E%2E", "/v1/adapters/..%2Fescapee",
                                  "/v1/adapters/%252E%252E%252Fescapee", "/v1/adapters/.hidden",
                                  "/v1/adapters/sneaky", "/v1/adapters/%2Fetc%2Fpasswd"])
def test_traversal_in_admin_paths_is_refused(env: Env, path: str) -> None:
    for method in ("GET", "DELETE"):
        response = env.http.request(method, path)
        assert response.status_code in (400, 404), (method, path, response.text)
    assert env.http.post(path + "/promote").status_code in (400, 404)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "../x", "source": "good-0"}, "invalid adapter name"),
        ({"name": "/abs", "source": "good-0"}, "invalid adapter name"),
        ({"name": "%2e%2e%2fx", "source": "good-0"}, "invalid adapter name"),
        ({"name": "ok", "source": "../outside/escapee"}, "must not contain '..'"),
        ({"name": "ok", "source": "/etc"}, "not absolute"),
        ({"name": "ok", "source": "sneaky"}, "outside the adapter root"),
        ({"name": "ok", "source": "%2e%2e/escapee"}, "no adapter directory"),
        ({"name": "ok", "source": "hf://../x"}, "invalid hub repo id"),
        ({"name": "ok"}, "`source` is required"),
        ({"name": "ok", "source": "good-0", "path": "/etc"}, "Unknown field `path`"),
    ],
)
def test_registering_bad_names_or_sources_is_refused(env: Env, body: dict[str, Any], message: str) -> None:
    response = env.http.post("/v1/adapters", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert "ok" not in _adapters(env)


def test_register_from_root_and_hub_then_serve(env: Env) -> None:
    created = env.http.post("/v1/adapters", json={"name": "alias-1", "source": "good-1"})
    assert created.status_code == 201 and created.json()["state"] == "host", created.text
    assert "alias-1" in _models(env)
    assert _text(_complete(env.http, "alias-1")) == env.refs["good-1"]
    assert env.http.post("/v1/adapters", json={"name": "alias-1", "source": "good-2"}).status_code == 409
    hub = env.http.post("/v1/adapters", json={"name": "from-hub", "source": "hf://org/hub-ada"})
    assert hub.status_code == 201 and hub.json()["source"] == "hf://org/hub-ada", hub.text
    assert _text(_complete(env.http, "from-hub")) == env.refs["good-5"]
    missing = env.http.post("/v1/adapters", json={"name": "no-hub", "source": "hf://org/not-cached"})
    assert missing.status_code == 400 and "not in the local hub cache" in missing.text
    assert _adapters(env)["no-hub"]["state"] == "failed"
    # A failed name can be registered again with a working source.
    fixed = env.http.post("/v1/adapters", json={"name": "no-hub", "source": "good-3"})
    assert fixed.status_code == 201 and _text(_complete(env.http, "no-hub")) == env.refs["good-3"]


def test_promote_demote_delete_under_traffic(env: Env) -> None:
    victim = "alias-victim"
    assert env.http.post("/v1/adapters", json={"name": victim, "source": "good-4"}).status_code == 201
    names = [*GOOD, None]
    deleted_at: list[float] = []

    victim_served = threading.Event()

    def one(i: int) -> tuple[str | None, float, httpx.Response]:
        name = victim if i % 3 == 0 else names[i % len(names)]
        started = time.monotonic()
        response = _complete(env.http, name)
        if name == victim and response.status_code == 200:
            victim_served.set()
        return name, started, response

    with ThreadPoolExecutor(6) as pool:
        traffic = [pool.submit(one, i) for i in range(48)]
        promoted = env.http.post("/v1/adapters/good-0/promote")
        assert promoted.status_code == 200 and promoted.json()["state"] == "pinned", promoted.text
        pinned = env.http.post("/v1/adapters/good-1/promote").json()
        assert pinned["state"] == "pinned"
        refused = env.http.post("/v1/adapters/good-2/promote")
        assert refused.status_code == 409
        assert "2 of the 3 GPU adapter slots are pinned (good-0, good-1)" in refused.json()["error"]["message"]
        assert victim_served.wait(30), "the victim never served"  # the delete lands in the victim's traffic
        deleted = env.http.delete(f"/v1/adapters/{victim}")
        deleted_at.append(time.monotonic())
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert victim not in _models(env) and victim not in _adapters(env)
        demoted = env.http.post("/v1/adapters/good-0/demote")
        assert demoted.status_code == 200 and demoted.json()["pinned"] is False
        # Off the GPU unless a request runs on it; with host memory contended it may go on to disk.
        assert demoted.json()["state"] in ("gpu", "host", "registered")
        results = [f.result() for f in traffic]
    served = {name for name, _, response in results if response.status_code == 200}
    assert set(names) <= served
    for name, started, response in results:
        if name == victim and response.status_code == 404:
            assert response.json()["error"]["code"] == "model_not_found"
            continue
        assert name != victim or started < deleted_at[0], "a request sent after the delete must get 404"
        assert _text(response) == env.refs["good-4" if name == victim else name], name
    assert _complete(env.http, victim).status_code == 404
    assert env.http.get(f"/v1/adapters/{victim}").status_code == 404
    infos = _adapters(env)
    assert infos["good-1"]["state"] == "pinned", "never evicted while pinned"
    assert infos["good-1"]["gpu_evictions"] == pinned["gpu_evictions"]
    assert infos["good-1"]["host_evictions"] == pinned["host_evictions"]
    assert env.http.post("/v1/adapters/good-1/demote").json()["state"] in ("gpu", "host", "registered")
    eventually(lambda: all(count == 0 for count in env.live.engine.adapter_refcounts().values()),
               what="every request released its adapter")


def test_delete_waits_for_requests_in_flight(env: Env) -> None:
    victim = "alias-in-flight"
    assert env.http.post("/v1/adapters", json={"name": victim, "source": "good-2"}).status_code == 201
    long_ref = _text(_complete(env.http, "good-2", max_tokens=40))
    engine = env.live.engine
    gate = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_complete, env.http, victim, 40)
        eventually(lambda: engine.adapter_refcounts().get(victim) == 1, what="the victim's request holds it")
        # Hold the engine thread between two steps, so the delete surely meets the request in flight.
        engine._post(lambda core: gate.wait(10), None)
        deleting = pool.submit(env.http.delete, f"/v1/adapters/{victim}")
        eventually(lambda: engine._inbox.qsize() > 0, what="the delete is queued")
        gate.set()
        deleted = deleting.result()
        assert deleted.status_code == 200 and deleted.json()["in_flight"] == 1
        assert _complete(env.http, victim).status_code == 404
        assert _text(running.result()) == long_ref
    eventually(lambda: engine.stats()["adapter_refcount_total"] == 0, what="no adapter held")


def test_hostile_target_regex_is_400_and_spares_health_and_other_adapters(
    env: Env, server_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters import module_match

    monkeypatch.setattr(module_match, "PER_MATCH_SECONDS", 1.0)  # long enough to probe /health meanwhile
    # Backtracks exponentially against a module name; `re` would hold the GIL until it gave up.
    write_lora_dir(env.root / "hostile-regex", model_dims(server_model_dir), target_modules=r"(?:.|\w|[a-z]|\S)*\.q")
    gaps: list[float] = []
    with ThreadPoolExecutor(2) as pool:
        registering = pool.submit(env.http.post, "/v1/adapters", json={"name": "hostile", "source": "hostile-regex"})
        other = pool.submit(_complete, env.http, "good-3")
        with httpx.Client(base_url=env.live.base_url, timeout=30.0) as probe:
            while not registering.done():
                started = time.monotonic()
                assert probe.get("/health").status_code == 200
                gaps.append(time.monotonic() - started)
        response = registering.result()
        assert _text(other.result()) == env.refs["good-3"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_failed" and "could not be matched against the module names" in error["message"]
    assert gaps and max(gaps) < 0.5, f"/health took up to {max(gaps):.2f} s while the pattern was matched"


def test_adapter_files_linking_out_of_the_root_are_400_without_their_contents(
    env: Env, server_model_dir: Path
) -> None:
    secret = "value-of-a-file-outside-the-root"
    outside_config = env.outside / "outside-config.json"
    outside_config.write_text(json.dumps({"peft_type": "LORA", "r": secret, "target_modules": ["q_proj"]}))
    adapter = write_lora_dir(env.root / "leaky-config", model_dims(server_model_dir))
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").symlink_to(outside_config)
    response = env.http.post("/v1/adapters", json={"name": "leaky", "source": "leaky-config"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "adapter_config.json is a link leading outside the adapter root" in message
    assert secret not in message and str(env.outside) not in message
    served = _complete(env.http, "leaky-config")  # discovered from the root: the same refusal
    assert served.status_code == 400 and secret not in served.text


def test_a_100k_character_source_is_400_naming_the_bound(env: Env) -> None:
    for source in ("a" * 100_000, "b" * 1000, "hf://org/" + "c" * 100_000):
        response = env.http.post("/v1/adapters", json={"name": "long-source", "source": source})
        assert response.status_code == 400, response.text[:300]
        assert len(response.text) < 1000
    assert "at most 1024" in env.http.post("/v1/adapters", json={"name": "x", "source": "a" * 100_000}).text
    assert "long-source" not in _adapters(env)


@pytest.mark.parametrize("name", [MODEL_NAME, "ft-ftjob-0123456789ab", "ft-ftjob-0123456789ab:ckpt-3", "ft-x"])
def test_reserved_adapter_names_are_409(env: Env, name: str) -> None:
    response = env.http.post("/v1/adapters", json={"name": name, "source": "good-0"})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "reserved_name" and f"`{name}` is reserved" in error["message"]
    assert name not in _adapters(env)
    assert env.http.post(f"/v1/adapters/{name}/promote").status_code == 404


def test_restored_root_adapters_are_checked_as_client_sources(tmp_path: Path) -> None:
    from server.admin.journal import _register_again

    class Recorder:
        adapter_config = AdapterConfig(adapter_root=tmp_path)

        def __init__(self) -> None:
            self.calls: list[tuple[str, str, str]] = []

        async def register_adapter(self, name: str, source: str) -> None:
            self.calls.append(("client", name, source))

        async def add_adapter(self, name: str, source: str) -> None:
            self.calls.append(("operator", name, source))

    engine = Recorder()
    outside = tmp_path.parent / "elsewhere"
    for name, source in [("a", str(tmp_path.resolve() / "ada")), ("b", str(outside)), ("c", "hf://org/x")]:
        asyncio.run(_register_again(engine, name, source))
    assert engine.calls == [("client", "a", "ada"), ("operator", "b", str(outside)), ("operator", "c", "hf://org/x")]


def test_cli_adapter_flags() -> None:
    from server import cli

    args = cli.build_parser().parse_args([
        "serve", "--max-gpu-adapters", "3", "--max-cpu-adapters", "5", "--adapter-root", "/",
        "--refuse-base-mismatch", "--max-lora-rank", "32", "--adapter", "hub=hf://org/repo@v1",
    ])
    config = cli.adapter_config(args)
    assert (args.max_loras, args.max_lora_rank, args.adapters) == (3, 32, [("hub", "hf://org/repo@v1")])
    assert (config.max_cpu_adapters, config.adapter_root, config.refuse_base_mismatch) == (5, Path("/"), True)
    assert cli.engine_config(args, "m").max_loras == 3
    too_few = cli.build_parser().parse_args(["serve", "--max-gpu-adapters", "6", "--max-cpu-adapters", "4"])
    with pytest.raises(ValueError, match="must be at least --max-loras"):
        cli.adapter_config(too_few)


def test_an_adapter_copied_into_the_root_is_served_on_its_first_request(env: Env, server_model_dir: Path) -> None:
    """Found by the off-loop lookup (ServerState.discover), on every route that names a model."""
    dims = model_dims(server_model_dir)
    for i, path in enumerate(("/v1/completions", "/v1/chat/completions", "/v1/models/{name}")):
        name = f"late-{i}"
        write_lora_dir(env.root / name, dims, seed=900 + i, scale=1.5)
        if path == "/v1/completions":
            response = _complete(env.http, name)
        elif path == "/v1/chat/completions":
            response = env.http.post(path, json={"model": name, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        else:
            response = env.http.get(path.format(name=name))
        assert response.status_code == 200, (path, response.text)
    assert _complete(env.http, "never-there").status_code == 404
