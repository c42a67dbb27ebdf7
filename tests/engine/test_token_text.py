from __future__ import annotations

import random

import pytest

from engine.token_text import TokenText
from tests.engine.test_detokenizer import TEXTS, build_sentencepiece_tokenizer
from tests.factories import build_tokenizer


@pytest.fixture(scope="module")
def byte_level():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece():
    return build_sentencepiece_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", [*TEXTS, "中文 猫 🐍 ✨"])
def test_byte_level_token_bytes_join_into_the_utf8_text(byte_level, text: str) -> None:
    ids = encode(byte_level, text)
    tt = TokenText(byte_level)
    assert b"".join(tt.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_byte_level_random_sequences_decode_like_the_tokenizer(byte_level) -> None:
    tt = TokenText(byte_level)
    rng = random.Random(0)
    special = set(byte_level.added_tokens_decoder)
    ordinary = [i for i in range(len(byte_level)) if i not in special]
    for _ in range(30):
        ids = [rng.choice(ordinary) for _ in range(rng.randrange(1, 20))]
        joined = b"".join(tt.token_bytes(i) for i in ids)
        assert joined.decode("utf-8", errors="replace") == byte_level.decode(ids)


def test_partial_character_tokens_show_as_escaped_bytes(byte_level) -> None:
    tt = TokenText(byte_level)
    ids = encode(byte_level, "中文 猫")
    partial = [i for i in ids if byte_level.decode([i]).endswith("\ufffd")]
    assert partial
    for token_id in partial:
        data = tt.token_bytes(token_id)
        shown = tt.token_str(token_id)
        assert shown.startswith("bytes:")
        assert "\ufffd" not in shown
        expected = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data)
        assert shown == "bytes:" + expected
    whole = [i for i in ids if i not in partial]
    assert whole
    for token_id in whole:
        assert tt.token_str(token_id) == byte_level.decode([token_id])


def test_special_tokens_are_their_text(byte_level, sentencepiece) -> None:
    for tok in (byte_level, sentencepiece):
        tt = TokenText(tok)
        assert tt.token_bytes(tok.eos_token_id) == tok.eos_token.encode()
        assert tt.token_str(tok.eos_token_id) == tok.eos_token


def test_sentencepiece_spaces_and_byte_tokens(sentencepiece) -> None:
    tt = TokenText(sentencepiece)
    text = "Hello 中文 猫 🐍 world"
    ids = encode(sentencepiece, text)
    pieces = sentencepiece.convert_ids_to_tokens(ids)
    assert "<0xE7>" in pieces and any(p.startswith("▁") and len(p) > 1 for p in pieces)
    # Metaspace prepends one space that the decoder strips again.
    assert b"".join(tt.token_bytes(i) for i in ids) == b" " + text.encode("utf-8")
    byte_token = ids[pieces.index("<0xE7>")]
    assert tt.token_bytes(byte_token) == b"\xe7"
    assert tt.token_str(byte_token) == "bytes:\\xe7"


def test_results_are_cached_and_unknown_ids_are_empty(byte_level) -> None:
    calls: list[int] = []

    class Counting:
        added_tokens_decoder = byte_level.added_tokens_decoder
        backend_tokenizer = byte_level.backend_tokenizer

        def convert_ids_to_tokens(self, token_id: int):
            calls.append(token_id)
            return byte_level.convert_ids_to_tokens(token_id)

    tt = TokenText(Counting())
    token_id = encode(byte_level, "Hello")[0]
    assert tt.token_str(token_id) == tt.token_str(token_id) == byte_level.decode([token_id])
    assert tt.token_bytes(token_id) == byte_level.decode([token_id]).encode()
    assert calls == [token_id]
    assert tt.token_bytes(len(byte_level) + 10) == b""
    assert tt.token_str(len(byte_level) + 10) == ""
