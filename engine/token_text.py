"""The text and exact bytes of single tokens, for logprobs (OpenAI `token` and `bytes`).

A token on its own may hold part of a UTF-8 character (byte-level BPE merges bytes, not
characters; sentencepiece falls back to <0xNN> byte tokens), so its bytes are recovered
from the vocabulary string rather than by decoding the id:
  * byte-level BPE: each character of the token string stands for one byte (GPT-2's
    printable byte alphabet);
  * sentencepiece style: '▁' is a space and <0xNN> is the byte NN;
  * added and special tokens: their content, UTF-8 encoded.
Concatenating token_bytes over a sequence gives the UTF-8 of its text (sentencepiece
decoders also drop the first leading space, which token_bytes keeps).
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"


class TokenText:
    """Per-token text and raw bytes for logprobs (OpenAI `token` and `bytes`).

    `token_str` is the token's text when its bytes are valid UTF-8 on their own. Otherwise
    (a piece of a multi-byte character) it is "bytes:" followed by the bytes, printable ASCII
    as is and every other byte as a \\xNN escape, e.g. "bytes:\\xe4\\xb8": the form OpenAI's
    API shows for such tokens. The exact bytes are always in `token_bytes` (the `bytes` field),
    and the bytes of consecutive tokens join into the text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._added = {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}
        self._bytes: dict[int, bytes] = {}
        self._strs: dict[int, str] = {}

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._compute_bytes(token_id)
        return cached

    def token_str(self, token_id: int) -> str:
        cached = self._strs.get(token_id)
        if cached is None:
            cached = self._strs[token_id] = _display(self.token_bytes(token_id))
        return cached

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not piece:  # ids past the tokenizer's vocabulary (padded embedding rows)
            return b""
        if self._byte_level:
            return b"".join(
                bytes([_BYTE_DECODER[ch]]) if ch in _BYTE_DECODER else ch.encode("utf-8") for ch in piece
            )
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")


def _display(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    if hasattr(tokenizer, "byte_decoder"):  # the Python GPT-2 family
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    # The decoder's own serialization names its type, also inside a Sequence of decoders.
    return b'"type":"ByteLevel"' in decoder.__getstate__()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}
