"""How much one API request may ask of the engine, checked before any work is done for it.

A request starts one engine request per choice (prompts × n). Counting them, and the length
of every prompt of token ids, costs nothing next to tokenizing the prompts or creating the
engine requests, so a request that could never be served is refused before either.
"""

from __future__ import annotations

from typing import Any

from engine.errors import EngineOverloadedError
from server.http.errors import bad_request, from_engine_error
from server.openai.schemas import MAX_CHOICES, PromptInput


def check_raw_prompt(prompt: Any, max_model_len: int) -> None:
    """Bound a completions `prompt` as sent, before validation builds it again.

    Several prompts are at most MAX_CHOICES (each is a choice at least); a prompt of token ids
    longer than the context can never run.
    """
    if not isinstance(prompt, list):
        return
    if prompt and all(isinstance(item, list | str) for item in prompt):
        if len(prompt) > MAX_CHOICES:
            raise bad_request(f"`prompt` holds {len(prompt)} prompts; a request may have at most {MAX_CHOICES}.",
                              param="prompt", code="too_many_choices")
        token_lists = [item for item in prompt if isinstance(item, list)]
    else:
        token_lists = [prompt]
    for ids in token_lists:
        if len(ids) > max_model_len:
            raise bad_request(f"The prompt is {len(ids)} tokens long; this model's context is {max_model_len} "
                              "tokens and leaves no room to generate.", param="prompt",
                              code="context_length_exceeded")


def prompt_count(prompt: PromptInput) -> int:
    """How many prompts a validated `prompt` holds."""
    if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
        return 1
    return len(prompt)


def check_choices(engine: Any, num_prompts: int, n: int, queued: bool = True) -> int:
    """The number of choices (prompts × n), or a 400 (never fits) or a 429 (not now).

    queued: the choices become engine requests (not so for an echo with max_tokens 0).
    Thread-safe: it only reads the engine's configuration and last stats.
    """
    num_choices = num_prompts * n
    param = "prompt" if num_prompts > 1 else "n"
    if num_choices > MAX_CHOICES:
        raise bad_request(f"{num_prompts} prompts × n={n} is {num_choices} choices; a request may have at most "
                          f"{MAX_CHOICES}.", param=param, code="too_many_choices")
    config = getattr(engine, "config", None)
    if not queued or config is None:  # an engine without queue limits answers for itself
        return num_choices
    capacity = config.max_num_seqs + config.max_waiting
    if num_choices > capacity:
        raise bad_request(f"The request has {num_choices} choices; this server holds at most {capacity} "
                          "requests, running and waiting.", param=param, code="too_many_choices")
    in_flight = engine.stats().get("num_streams", 0)
    if in_flight + num_choices > capacity:
        overloaded = EngineOverloadedError(f"the server is at capacity ({in_flight} requests in flight, "
                                           f"{num_choices} more asked for); retry later")
        raise from_engine_error(overloaded, "")
    return num_choices
