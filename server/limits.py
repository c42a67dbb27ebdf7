"""Every limit on what a request may ask for, decided here for every surface.

The operator's limits (`Limits`: body size, prompt tokens, a `max_tokens` ceiling, concurrency)
and the model's context meet in `budget`: the tokens one choice may generate, or a 400 naming
the parameter. The OpenAI routes, the Responses API (through the chat route) and SeekrFlow all
ask it, so a request too long for one surface is too long for all, and none cuts a budget
to fit where another refuses it. The HTTP layer enforces the limits that need no tokenizer
(`server.http.middleware`); the prompt-token limit is checked where the prompt is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.http.errors import APIError, bad_request

# Most alternatives per token any request gets (OpenAI's cap); --max-logprobs may lower it.
MAX_TOP_LOGPROBS = 20
# Fields that ask for a budget, by surface: chat and SeekrFlow, chat and legacy completions, /v1/responses.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True)
class Limits:
    """Request limits; 0 turns one off."""

    max_request_bytes: int = 16 * 2**20
    max_prompt_tokens: int = 0  # beyond the model's context, which always applies
    max_tokens: int = 0  # ceiling on what one choice may generate; an omitted max_tokens is capped to it
    max_concurrent_requests: int = 0  # in-flight requests on the generation routes

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_prompt_tokens", "max_tokens", "max_concurrent_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (0: no limit), got {value!r}")

    def over_ceiling(self, field: str, value: object) -> APIError | None:
        """The 400 for a requested budget above the `max_tokens` ceiling, else None."""
        if (self.max_tokens and isinstance(value, int) and not isinstance(value, bool)
                and value > self.max_tokens):
            return APIError(400, f"`{field}` is {value}; this server generates at most {self.max_tokens} tokens "
                            "per choice.", param=field, code="max_tokens_exceeded")
        return None

    def check_prompt(self, prompt_tokens: int) -> None:
        """400 for a prompt longer than the operator allows (the context is checked by `budget`)."""
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise APIError(400, f"The prompt is {prompt_tokens} tokens long; this server accepts at most "
                           f"{self.max_prompt_tokens} prompt tokens.", code="prompt_too_long")

    def capped(self, max_tokens: int) -> int:
        """A budget no larger than the ceiling: what an omitted `max_tokens` (the rest of the context) becomes."""
        return min(max_tokens, self.max_tokens) if self.max_tokens else max_tokens


def budget(wanted: int | None, prompt_len: int, max_model_len: int, prompt_param: str) -> int:
    """The requested budget, or the rest of the context; 400 when it cannot fit.

    0 (scoring the prompt, nothing generated) only needs the prompt to fit."""
    room = max_model_len - prompt_len
    if room < 1 and not (wanted == 0 and room == 0):
        raise bad_request(
            f"The prompt is {prompt_len} tokens long; this model's context is {max_model_len} tokens "
            "and leaves no room to generate.",
            param=prompt_param, code="context_length_exceeded",
        )
    if wanted is None:
        return room
    if wanted > room:
        raise bad_request(
            f"This model's context is {max_model_len} tokens; the prompt takes {prompt_len} and "
            f"{wanted} more were requested.",
            param="max_tokens", code="context_length_exceeded",
        )
    return wanted
