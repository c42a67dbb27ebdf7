"""What a soak run throws at the server besides valid traffic: bad bodies and broken adapters.

`invalid_requests` are requests the server must refuse with a 4xx in the OpenAI error envelope.
`fuzzed_bodies` are valid bodies with random bytes flipped: they may or may not parse, so the
only rule for them is "never a 5xx". `write_broken_adapters` makes adapter directories that must
fail to load (and fail only the requests that name them).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ADAPTERS = "/v1/adapters"
_MESSAGES = [{"role": "user", "content": "Say something."}]


@dataclass(frozen=True)
class RawRequest:
    """A POST with a raw body; `kind` names the case in the report."""

    kind: str
    path: str
    body: bytes
    content_type: str = "application/json"


def _chat(**fields: Any) -> bytes:
    return json.dumps({"messages": _MESSAGES, "max_tokens": 4, **fields}).encode()


def invalid_requests(base_model: str) -> list[RawRequest]:
    """Every case must come back 4xx with `{"error": {message, type, param, code}}`."""
    m = {"model": base_model}
    cases = [
        RawRequest("empty_body", CHAT, b""),
        RawRequest("truncated_json", CHAT, _chat(**m)[:-7]),
        RawRequest("not_json", CHAT, b"\x00\xff\xfe garbage {"),
        RawRequest("json_array", CHAT, b"[1, 2, 3]"),
        RawRequest("json_string", CHAT, b'"hello"'),
        RawRequest("deeply_nested", CHAT, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        RawRequest("invalid_utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'),
        RawRequest("messages_not_list", CHAT, json.dumps({**m, "messages": "hi"}).encode()),
        RawRequest("messages_empty", CHAT, json.dumps({**m, "messages": []}).encode()),
        RawRequest("bad_role", CHAT, json.dumps({**m, "messages": [{"role": "wizard", "content": "x"}]}).encode()),
        RawRequest("temperature_high", CHAT, _chat(**m, temperature=5)),
        RawRequest("temperature_string", CHAT, _chat(**m, temperature="hot")),
        RawRequest("top_p_zero", CHAT, _chat(**m, top_p=0)),
        RawRequest("n_zero", CHAT, _chat(**m, n=0)),
        RawRequest("n_fraction", CHAT, _chat(**m, n=1.5)),
        RawRequest("max_tokens_negative", CHAT, _chat(**{**m, "max_tokens": -1})),
        RawRequest("max_tokens_huge", CHAT, _chat(**{**m, "max_tokens": 10**9})),
        RawRequest("top_logprobs_over_20", CHAT, _chat(**m, logprobs=True, top_logprobs=50)),
        RawRequest("logit_bias_bad_key", CHAT, _chat(**m, logit_bias={"not-a-token": 1})),
        RawRequest("logit_bias_out_of_vocab", CHAT, _chat(**m, logit_bias={"99999999": 1})),
        RawRequest("too_many_stops", CHAT, _chat(**m, stop=["a", "b", "c", "d", "e"])),
        RawRequest("presence_penalty_high", CHAT, _chat(**m, presence_penalty=3)),
        RawRequest("stream_options_without_stream", CHAT, _chat(**m, stream_options={"include_usage": True})),
        RawRequest("unknown_model", CHAT, _chat(model="no-such-model")),
        RawRequest("path_model", CHAT, _chat(model="../../etc/passwd")),
        RawRequest("long_model", CHAT, _chat(model="x" * 10_000)),
        RawRequest("unicode_model", CHAT, _chat(model="模型🎯")),
        RawRequest("prompt_over_context", COMPLETIONS,
                   json.dumps({**m, "prompt": "word " * 50_000, "max_tokens": 4}).encode()),
        RawRequest("prompt_bad_token_id", COMPLETIONS, json.dumps({**m, "prompt": [10**9], "max_tokens": 4}).encode()),
        RawRequest("completion_logprobs_over_5", COMPLETIONS,
                   json.dumps({**m, "prompt": "hi", "logprobs": 6}).encode()),
        # Numbers past what a tensor or torch's generator holds; strict types, as OpenAI's.
        RawRequest("top_k_huge", CHAT, _chat(**m, top_k=2**63)),
        RawRequest("top_k_past_int32", COMPLETIONS, json.dumps({**m, "prompt": "hi", "top_k": 2**31}).encode()),
        RawRequest("seed_past_uint64", CHAT, _chat(**m, seed=2**64)),
        RawRequest("seed_below_int64", CHAT, _chat(**m, seed=-(2**63) - 1)),
        RawRequest("logit_bias_key_past_int64", CHAT, _chat(**m, logit_bias={str(2**64): 1})),
        RawRequest("stop_token_id_negative", CHAT, _chat(**m, stop_token_ids=[-1])),
        RawRequest("stop_string_too_long", CHAT, _chat(**m, stop=["x" * 5000])),
        RawRequest("prompt_negative_token_id", COMPLETIONS, json.dumps({**m, "prompt": [-1], "max_tokens": 4}).encode()),
        RawRequest("prompt_token_id_past_int64", COMPLETIONS,
                   json.dumps({**m, "prompt": [[1], [2**64]], "max_tokens": 4}).encode()),
        RawRequest("max_tokens_string", CHAT, _chat(**{**m, "max_tokens": "999"})),
        RawRequest("max_tokens_float", CHAT, _chat(**{**m, "max_tokens": 999.0})),
        RawRequest("max_tokens_bool", COMPLETIONS, json.dumps({**m, "prompt": "hi", "max_tokens": True}).encode()),
        RawRequest("n_bool", CHAT, _chat(**m, n=True)),
        RawRequest("stream_string", CHAT, _chat(**m, stream="yes")),
        RawRequest("temperature_nan", CHAT, _chat(**m)[:-1] + b', "temperature": NaN}'),
        RawRequest("temperature_overflow", CHAT, _chat(**m)[:-1] + b', "temperature": 1e999}'),
        # Not text: UTF-8-encoded surrogates and lone surrogate escapes.
        RawRequest("surrogate_bytes_chat", CHAT,
                   b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}], "max_tokens": 4}'),
        RawRequest("surrogate_bytes_completions", COMPLETIONS, b'{"prompt": "\xed\xb0\x80", "max_tokens": 4}'),
        RawRequest("surrogate_escape_chat", CHAT,
                   b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 4}'),
        RawRequest("surrogate_bytes_adapter", ADAPTERS, b'{"name": "x\xed\xa0\x80", "source": "/nowhere"}'),
        # Large inputs, refused before any tokenizing or engine request (and off the event loop).
        RawRequest("too_many_messages", CHAT, json.dumps({**m, "messages": _MESSAGES * 2049}).encode()),
        RawRequest("prompts_times_n_over_limit", COMPLETIONS,
                   json.dumps({**m, "prompt": [[1]] * 3000, "n": 128, "max_tokens": 1}).encode()),
        RawRequest("message_longer_than_context", CHAT, _chat(**m, messages=[{"role": "user", "content": "x" * 2**21}])),
        RawRequest("too_many_json_containers", COMPLETIONS, b'{"prompt": [' + b",".join([b"[1]"] * 70_000) + b"]}"),
        # Adapter names and sources: bounded, and names the server or fine-tuning own are reserved.
        RawRequest("adapter_source_100k", ADAPTERS, json.dumps({"name": "long", "source": "a" * 100_000}).encode()),
        RawRequest("adapter_name_of_base_model", ADAPTERS,
                   json.dumps({"name": base_model, "source": "hf://org/x"}).encode()),
        RawRequest("adapter_name_of_checkpoint", ADAPTERS,
                   json.dumps({"name": "ft-ftjob-000000000000:ckpt-1", "source": "hf://org/x"}).encode()),
    ]
    return cases


def fuzzed_bodies(base_model: str, rng: np.random.Generator, count: int) -> list[RawRequest]:
    """Valid bodies with 1-8 random bytes replaced; the server may accept or refuse, never 5xx."""
    seeds = [
        _chat(model=base_model),
        _chat(model=base_model, temperature=0, stream=True),
        json.dumps({"model": base_model, "prompt": "Hello", "max_tokens": 3}).encode(),
    ]
    cases = []
    for i in range(count):
        pick = int(rng.integers(len(seeds)))
        body = bytearray(seeds[pick])
        for pos in rng.integers(0, len(body), int(rng.integers(1, 9))):
            body[int(pos)] = int(rng.integers(0, 256))
        cases.append(RawRequest(f"fuzz_{i}", COMPLETIONS if pick == 2 else CHAT, bytes(body)))
    return cases


BROKEN_KINDS = ("broken-shapes", "broken-corrupt", "broken-pickle", "broken-config", "broken-link", "broken-regex")
# target_modules that backtracks exponentially on a module name; matching must give up in time.
_HOSTILE_REGEX = r"(?:.|\w|[a-z]|\S)*\.q"


def write_broken_adapters(root: Path, template: Path) -> dict[str, Path]:
    """Adapter directories under `root` that must fail to load, made from a good `template`."""
    from safetensors.torch import load_file, save_file

    made = {}
    for kind in BROKEN_KINDS:
        path = root / kind
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
        made[kind] = path
    tensors = load_file(str(template / "adapter_model.safetensors"))
    # One column too many on every A: the shapes no longer match the base model's layers.
    wrong = {k: (v.new_zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(wrong, str(root / "broken-shapes" / "adapter_model.safetensors"))
    (root / "broken-corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not" * 64)
    # A harmless pickle: a server must refuse the format without unpickling anything.
    (root / "broken-pickle" / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    shutil.copy(template / "adapter_model.safetensors", root / "broken-config" / "adapter_model.safetensors")
    (root / "broken-config" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    shutil.copy(template / "adapter_model.safetensors", root / "broken-link" / "adapter_model.safetensors")
    (root / "broken-link" / "adapter_config.json").unlink()
    (root / "broken-link" / "adapter_config.json").symlink_to(os.devnull)  # a file outside the root
    shutil.copy(template / "adapter_model.safetensors", root / "broken-regex" / "adapter_model.safetensors")
    config = json.loads((template / "adapter_config.json").read_text())
    config.update(target_modules=_HOSTILE_REGEX, layers_to_transform=None, layers_pattern=None)
    (root / "broken-regex" / "adapter_config.json").write_text(json.dumps(config))
    return made


def copy_adapter(source: Path, dest: Path) -> Path:
    """A byte-identical copy of an adapter directory (serves the same outputs under a new name)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    return dest
