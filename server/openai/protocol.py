"""Response bodies of the OpenAI routes: completions, chunks, usage and logprobs shapes.

Plain dicts built in one place so that streamed and non-streamed answers cannot drift.
Logprobs are clamped to -9999.0 where the model gives -inf (JSON has no infinity).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.outputs import TokenLogprob
from server.version import system_fingerprint

LOGPROB_FLOOR = -9999.0


class TokenDecoder(Protocol):
    def token_str(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def clamp_logprob(value: float) -> float:
    if math.isnan(value) or value == -math.inf:
        return LOGPROB_FLOOR
    return max(float(value), LOGPROB_FLOOR)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: one per prompt token, the first None


# ---- chat ------------------------------------------------------------------------------


def _chat_token(decoder: TokenDecoder, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": decoder.token_str(token_id), "logprob": clamp_logprob(logprob),
            "bytes": list(decoder.token_bytes(token_id))}


def hides_last_token(token_ids: list[int], finish_reason: str | None, terminal_ids: set[int]) -> bool:
    """Whether the last token is the EOS (or stop token) that ended the choice.

    It counts as a completion token and keeps its logprob, but its text never reaches the
    output, so its `token` is "" and its `bytes` empty: the bytes then join into the text.
    """
    return finish_reason == "stop" and bool(token_ids) and token_ids[-1] in terminal_ids


def chat_logprobs(entries: list[TokenLogprob], decoder: TokenDecoder, hide_last: bool = False) -> dict[str, Any]:
    content = []
    for position, entry in enumerate(entries):
        if hide_last and position == len(entries) - 1:
            item = {"token": "", "logprob": clamp_logprob(entry.logprob), "bytes": []}
        else:
            item = _chat_token(decoder, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_chat_token(decoder, tid, lp) for tid, lp in entry.top]
        content.append(item)
    return {"content": content, "refusal": None}


def chat_completion(
    completion_id: str, created: int, model: str, choices: list[ChoiceState],
    decoder: TokenDecoder, want_logprobs: bool, prompt_tokens: int, terminal_ids: list[set[int]],
) -> dict[str, Any]:
    """The body; with vLLM's `prompt_logprobs` asked for (the first choice scored the prompt), those too."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": chat_logprobs(
                    choice.logprobs, decoder,
                    hides_last_token(choice.token_ids, choice.finish_reason, terminal_ids[choice.index]),
                ) if want_logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in choices
        ],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
    }
    if choices and choices[0].prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs(choices[0].prompt_logprobs, decoder)
    return body


def chat_chunk(
    completion_id: str, created: int, model: str, choices: list[dict[str, Any]], include_usage: bool,
    usage_body: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage_body
    return chunk


def chat_chunk_choice(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None, finish_reason: str | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


# ---- legacy completions ----------------------------------------------------------------


def completion_logprobs(
    entries: list[TokenLogprob], decoder: TokenDecoder, text_offset: int, hide_last: bool = False
) -> dict[str, Any]:
    """The legacy shape: parallel lists, `text_offset` counting characters from the text's start."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    offset = text_offset
    for position, entry in enumerate(entries):
        hidden = hide_last and position == len(entries) - 1
        token = "" if hidden else decoder.token_str(entry.token_id)
        tokens.append(token)
        token_logprobs.append(clamp_logprob(entry.logprob))
        top_logprobs.append({decoder.token_str(tid): clamp_logprob(lp) for tid, lp in entry.top})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def echo_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None], decoder: TokenDecoder
) -> dict[str, Any]:
    """The prompt's part of the legacy shape (`echo` with `logprobs`): the first token has nothing
    before it, so its logprob and top_logprobs are null; `text_offset` counts from 0."""
    tokens = [decoder.token_str(token_id) for token_id in prompt_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else clamp_logprob(e.logprob) for e in entries],
        "top_logprobs": [None if e is None else {decoder.token_str(t): clamp_logprob(lp) for t, lp in e.top}
                         for e in entries],
        "text_offset": offsets,
    }


def joined_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two pieces of the legacy shape, one after the other (the prompt's, then the completion's)."""
    return {key: first[key] + then[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def prompt_logprobs(entries: list[TokenLogprob | None], decoder: TokenDecoder) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first null) the token itself and its top
    alternatives, keyed by token id, each `{logprob, rank, decoded_token}`."""
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {str(entry.token_id): {"logprob": clamp_logprob(entry.logprob), "rank": entry.rank,
                                          "decoded_token": decoder.token_str(entry.token_id)}}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            position.setdefault(str(token_id), {"logprob": clamp_logprob(logprob), "rank": rank,
                                                "decoded_token": decoder.token_str(token_id)})
        out.append(position)
    return out


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    completion_id: str, created: int, model: str, choices: list[dict[str, Any]],
    usage_body: dict[str, int] | None, include_usage_key: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": choices,
    }
    if include_usage_key:
        body["usage"] = usage_body
    return body


# ---- models ----------------------------------------------------------------------------


def model_card(model_id: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "quiver",
            "root": root, "parent": parent}


@dataclass
class ResponseMeta:
    """What every body or chunk of one response shares."""

    completion_id: str
    created: int
    model: str
    decoder: TokenDecoder
    num_choices: int
    prompt_tokens: int
    top_logprobs: int | None = None  # None: no logprobs wanted
    include_usage: bool = False
    echo_texts: list[str] = field(default_factory=list)  # legacy completions: per choice
    terminal_ids: list[set[int]] = field(default_factory=list)  # per choice: ids that end it unseen
    # legacy completions with `echo` and `logprobs`: per choice, the prompt whose logprobs lead its logprobs
    echo_prompt_ids: list[list[int]] = field(default_factory=list)
