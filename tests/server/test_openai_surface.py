"""The OpenAI surface around generation: system_fingerprint, clear 400s for what is not supported,
vLLM's /tokenize, /detokenize and /version, --max-logprobs, and opt-in CORS; in-process over the
fake engine."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.state import ServerState
from server.version import VERSION
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.fake_engine import FakeEngine

MESSAGES = [{"role": "user", "content": "Name three parts of an arrow."}]
ADAPTER = ADAPTER_NAMES[3]


@pytest.fixture
def client(fake):
    return fake.client()


# ---- system_fingerprint ------------------------------------------------------------------------


def test_system_fingerprint_on_every_response_and_chunk(client):
    fingerprints = set()
    for model in (MODEL_NAME, ADAPTER):
        seen = []
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        seen.append(chat.system_fingerprint)
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and not chunks[-1].choices  # the usage chunk carries it too
        seen += [chunk.system_fingerprint for chunk in chunks]
        completion = client.completions.create(model=model, prompt="Hello", max_tokens=4)
        seen.append(completion.system_fingerprint)
        seen += [chunk.system_fingerprint
                 for chunk in client.completions.create(model=model, prompt="Hello", max_tokens=4, stream=True)]
        assert len(set(seen)) == 1, seen  # stable for one served model and build
        assert isinstance(seen[0], str) and seen[0].startswith("fp_quiver_")
        fingerprints.add(seen[0])
    assert len(fingerprints) == 2  # the base and an adapter are different served models


# ---- clear 400s ------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
])
def test_media_content_parts_are_refused_by_name(client, part):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4)
    error = info.value.body
    assert info.value.status_code == 400
    assert error["message"] == (f"content part type '{part['type']}' is not supported: this server serves "
                                "text-only models")
    assert error["param"] == "messages[1].content[1].type"
    assert "more error" not in error["message"]


def test_text_parts_still_work_and_other_part_types_are_named(fake, client):
    parts = [{"type": "text", "text": "Name three parts "}, {"type": "text", "text": "of an arrow."}]
    client.chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0,
                                   messages=[{"role": "user", "content": parts}])
    client.chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0, messages=MESSAGES)
    joined, plain = fake.engine.requests
    assert joined.prompt_token_ids == plain.prompt_token_ids
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=4, messages=[
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}])
    assert info.value.body["param"] == "messages[0].content[0].type"
    assert "'refusal' is not supported" in info.value.body["message"]


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 2, "n": 2}, "best_of"),
    ({"best_of": 3}, "best_of"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
])
def test_completion_options_that_would_change_the_answer_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, **kwargs)
    assert info.value.body["param"] == param
    assert info.value.body["code"] == "unsupported_parameter"


def test_best_of_one_is_accepted(fake, client):
    client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0)
    best = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, best_of=1)
    assert len(best.choices) == 1
    plain, best_of_one = fake.engine.requests
    assert best_of_one.params == plain.params and best_of_one.prompt_token_ids == plain.prompt_token_ids


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"store": True}, "store"),
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"extra_body": {"moderation": {"model": "omni-moderation-latest"}}}, "moderation"),
    ({"extra_body": {"min_p": 0.05}}, "min_p"),
    ({"extra_body": {"guided_choice": ["a", "b"]}}, "guided_choice"),
    ({"extra_body": {"chat_template": "{{ messages }}"}}, "chat_template"),
    ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, "chat_template_kwargs"),
    ({"extra_body": {"echo": True}}, "echo"),
    ({"extra_body": {"best_of": 2}}, "best_of"),
])
def test_chat_options_that_would_change_the_answer_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param
    assert info.value.body["code"] == "unsupported_parameter"
    assert param.split("_")[0] in info.value.body["message"].lower()


def test_options_that_change_nothing_are_accepted_and_ignored(fake, client):
    kwargs: dict[str, Any] = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    client.chat.completions.create(**kwargs)
    client.chat.completions.create(
        user="u-1", metadata={"team": "evals"}, store=False, service_tier="auto", safety_identifier="h-1",
        prompt_cache_key="k", prediction={"type": "content", "content": "an arrow"}, modalities=["text"],
        verbosity="medium", extra_body={"min_p": 0, "use_beam_search": False, "skip_special_tokens": True},
        **kwargs)
    plain, ignored = fake.engine.requests
    assert ignored.params == plain.params and ignored.prompt_token_ids == plain.prompt_token_ids


# ---- --max-logprobs --------------------------------------------------------------------------------


def test_max_logprobs_caps_top_logprobs_and_logprobs(fake, client):
    fake.state.max_logprobs = 3
    try:
        ok = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, logprobs=True,
                                            top_logprobs=3)
        assert len(ok.choices[0].logprobs.content[0].top_logprobs) == 3
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, logprobs=True,
                                           top_logprobs=4)
        assert info.value.body["param"] == "top_logprobs" and "--max-logprobs" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, logprobs=4)
        assert info.value.body["param"] == "logprobs"
        for create in (client.completions.create, client.chat.completions.create):
            kwargs = {"prompt": "Hello"} if create == client.completions.create else {"messages": MESSAGES}
            with pytest.raises(openai.BadRequestError) as info:
                create(model=MODEL_NAME, max_tokens=2, extra_body={"prompt_logprobs": 4}, **kwargs)
            assert info.value.body["param"] == "prompt_logprobs"
            assert create(model=MODEL_NAME, max_tokens=2, extra_body={"prompt_logprobs": 3}, **kwargs)
    finally:
        fake.state.max_logprobs = 20
    assert client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, logprobs=4).choices[0].logprobs


# ---- /tokenize, /detokenize, /version --------------------------------------------------------------


def test_tokenize_messages_counts_what_a_chat_completion_sees(fake, client):
    with fake.http() as http:
        for model in (MODEL_NAME, ADAPTER):
            answer = http.post("/tokenize", json={"model": model, "messages": MESSAGES}).json()
            chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
            assert answer["count"] == chat.usage.prompt_tokens == len(answer["tokens"])
            assert answer["max_model_len"] == fake.engine.max_model_len
            assert answer["tokens"] == fake.engine.requests[-1].prompt_token_ids
        without = http.post("/tokenize", json={"model": MODEL_NAME, "messages": MESSAGES,
                                               "add_generation_prompt": False}).json()
        assert without["count"] < answer["count"] and answer["tokens"][:without["count"]] == without["tokens"]
        text = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": answer["tokens"]}).json()["prompt"]
        assert MESSAGES[0]["content"] in text and text.endswith("assistant\n")


def test_tokenize_prompt_counts_what_a_completion_sees_and_round_trips(fake, client):
    prompt = "Déjà vu: 中文 🎯 and the quick brown fox."
    with fake.http() as http:
        answer = http.post("/tokenize", json={"model": ADAPTER, "prompt": prompt, "return_token_strs": True}).json()
        completion = client.completions.create(model=ADAPTER, prompt=prompt, max_tokens=1)
        assert answer["count"] == completion.usage.prompt_tokens == len(answer["tokens"])
        assert answer["token_strs"] == fake.engine.tokenizer.convert_ids_to_tokens(answer["tokens"])
        assert http.post("/detokenize", json={"model": ADAPTER, "tokens": answer["tokens"]}).json() == {
            "prompt": prompt}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("/tokenize", {"model": MODEL_NAME}, 400, "prompt"),
    ("/tokenize", {"model": MODEL_NAME, "prompt": 7}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type"),
    ("/detokenize", {"model": MODEL_NAME, "tokens": [1, 10**9]}, 400, "tokens"),
    ("/detokenize", {"model": MODEL_NAME, "tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"model": MODEL_NAME, "tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"model": "no-such-model", "tokens": [1]}, 404, "model"),
])
def test_tokenizer_routes_refuse_bad_requests_in_the_error_envelope(fake, path, body, status, param):
    with fake.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_version(fake):
    with fake.http() as http:
        assert http.get("/version").json() == {"version": VERSION}


def test_tokenizer_routes_need_the_api_key(fake_app):
    secured = fake_app(api_key="sekret")
    with secured.http() as http:
        assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        assert http.post("/detokenize", json={"tokens": [1]}).status_code == 401
        assert http.get("/version").status_code == 200
        answer = http.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer sekret"})
        assert answer.status_code == 200 and answer.json()["count"] >= 1


# ---- CORS ---------------------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def _cors_client(**kwargs: Any) -> TestClient:
    return TestClient(create_app(ServerState(FakeEngine({"a": "/x/a"})), **kwargs))


def test_cors_is_off_by_default():
    with _cors_client() as http:
        preflight = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        assert preflight.status_code == 405
        assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": ORIGIN}).headers


def test_cors_preflight_allowed_and_refused_by_origin():
    with _cors_client(allowed_origins=[ORIGIN], api_key="sekret") as http:
        allowed = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert allowed.status_code == 200  # a preflight carries no key: it is answered before auth
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        refused = http.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        models = http.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer sekret"})
        assert models.status_code == 200 and models.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in models.headers["access-control-expose-headers"].lower()
        unauthorized = http.get("/v1/models", headers={"Origin": ORIGIN})  # the browser can read why
        assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
        other = http.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer sekret"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_any_origin():
    with _cors_client(allowed_origins=["*"]) as http:
        preflight = http.options("/v1/completions", headers={"Origin": "https://anywhere.example", **PREFLIGHT})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


# ---- docs/OPENAI.md -------------------------------------------------------------------------------------


def _documented(section: str) -> set[str]:
    """The parameter names in the first column of a section's tables."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "OPENAI.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names |= {re.split(r"[.\[ :]", name)[0] for name in re.findall(r"`([^`]+)`", first_cell)}
    return names


@pytest.mark.parametrize(("section", "params"), [
    ("Chat completions", "openai.types.chat.completion_create_params"),
    ("Completions", "openai.types.completion_create_params"),
    ("Responses", "openai.types.responses.response_create_params"),
])
def test_docs_list_every_request_parameter_of_the_sdk(section, params):
    import importlib

    sdk = set(importlib.import_module(params).CompletionCreateParamsBase.__annotations__
              if section != "Responses" else importlib.import_module(params).ResponseCreateParamsBase.__annotations__)
    missing = sdk - _documented(section)
    assert not missing, f"docs/OPENAI.md does not say what {section} does with {sorted(missing)}"
