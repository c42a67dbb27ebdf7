"""Response builders: chunk and logprobs shapes, clamping, usage."""

from __future__ import annotations

import json
import math

from engine.outputs import TokenLogprob
from server.openai import protocol


class _Decoder:
    def token_str(self, token_id: int) -> str:
        return f"t{token_id}"

    def token_bytes(self, token_id: int) -> bytes:
        return f"t{token_id}".encode()


def test_infinite_and_nan_logprobs_are_clamped_and_serialize():
    entries = [TokenLogprob(1, -math.inf, [(1, -math.inf), (2, math.nan)]), TokenLogprob(2, -0.5, [])]
    body = protocol.chat_logprobs(entries, _Decoder())
    assert body["content"][0]["logprob"] == protocol.LOGPROB_FLOOR
    assert [t["logprob"] for t in body["content"][0]["top_logprobs"]] == [protocol.LOGPROB_FLOOR] * 2
    assert body["content"][1] == {"token": "t2", "logprob": -0.5, "bytes": list(b"t2"), "top_logprobs": []}
    json.dumps(body, allow_nan=False)
    legacy = protocol.completion_logprobs(entries, _Decoder(), text_offset=0)
    assert legacy["token_logprobs"] == [protocol.LOGPROB_FLOOR, -0.5]
    json.dumps(legacy, allow_nan=False)


def test_terminal_token_keeps_its_logprob_but_no_text():
    entries = [TokenLogprob(5, -0.1, [(5, -0.1)]), TokenLogprob(9, -0.2, [(9, -0.2)])]
    assert protocol.hides_last_token([5, 9], "stop", {9})
    assert not protocol.hides_last_token([5, 9], "length", {9})
    assert not protocol.hides_last_token([5, 8], "stop", {9})
    content = protocol.chat_logprobs(entries, _Decoder(), hide_last=True)["content"]
    assert content[-1]["token"] == "" and content[-1]["bytes"] == [] and content[-1]["logprob"] == -0.2
    legacy = protocol.completion_logprobs(entries, _Decoder(), text_offset=3, hide_last=True)
    assert legacy["tokens"] == ["t5", ""] and legacy["text_offset"] == [3, 5]


def test_usage_and_model_card():
    assert protocol.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    card = protocol.model_card("a", 1, "base", "base")
    assert card == {"id": "a", "object": "model", "created": 1, "owned_by": "quiver", "root": "base",
                    "parent": "base"}
