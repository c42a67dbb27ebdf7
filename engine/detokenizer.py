"""Incremental, UTF-8 safe detokenization with stop strings.

Each new token is decoded inside a short window of the tokens before it (the prefix/read
offset technique): the text of the window minus the text of its prefix is what the new
tokens add. Decoding in context keeps sentencepiece's leading-space handling and byte-level
BPE's multi-token characters right, and costs O(window) per token, not O(output).

Two kinds of text are held back:
  * a trailing U+FFFD, which is what an incomplete multi-byte character decodes to until
    its remaining bytes arrive;
  * a suffix that could be the beginning of a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens used as the first window, so the first output token decodes in context.
_INITIAL_WINDOW = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = [s for s in stop if s]  # an empty stop string would match everywhere
        self._max_stop = max((len(s) for s in self._stops), default=0)
        # The window: ids[:read] decode to `prefix_text`, already accounted for; ids[read:] are
        # new. `consumed` counts characters past prefix_text already taken from a window
        # whose end was still incomplete.
        self._ids = list(prompt_token_ids[-_INITIAL_WINDOW:])
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._consumed = 0
        self._pending = ""  # decoded, not yet released: a possible stop-string start
        self._released: list[str] = []
        self._stopped = False
        self._finished = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        return "".join(self._released)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that became releasable ("" if none)."""
        if self._stopped or self._finished:
            return ""
        self._ids.append(token_id)
        self._pending += self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At finish: release what was held back, except an incomplete character at the end."""
        if self._stopped or self._finished:
            return ""
        self._pending += self._advance(final=True)
        self._finished = True
        return self._release(final=True)

    def _advance(self, final: bool) -> str:
        window_text = self._decode(self._ids)
        whole = not window_text.endswith(_REPLACEMENT)
        complete = window_text if whole else window_text.rstrip(_REPLACEMENT)
        fresh = complete[len(self._prefix_text) + self._consumed :]
        if whole and len(window_text) > len(self._prefix_text):
            # The window ends on a whole character: slide it so it starts at the tokens
            # just read, which are the context for the next ones.
            self._ids = self._ids[self._read :]
            self._read = len(self._ids)
            self._prefix_text = self._decode(self._ids)
            self._consumed = 0
        elif not final:
            self._consumed += len(fresh)
        return fresh

    def _release(self, final: bool) -> str:
        pending = self._pending
        cut = self._first_stop(pending)
        if cut is not None:
            self._stopped = True
            out, self._pending = pending[:cut], ""
        elif final:
            out, self._pending = pending, ""
        else:
            keep = self._stop_prefix_length(pending)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._released.append(out)
        return out

    def _first_stop(self, text: str) -> int | None:
        # Released text never ends with the start of a stop string, so any match starts in
        # `text`; the earliest match wins across all stop strings.
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for length in range(min(len(text), self._max_stop - 1), 0, -1):
            suffix = text[-length:]
            if any(s.startswith(suffix) for s in self._stops):
                return length
        return 0

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: it rewrites spaces around punctuation depending on what follows, which
        # would make a window's text disagree with its prefix's.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
