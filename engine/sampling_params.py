"""Per-request sampling parameters, validated where a user can set them."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_PROMPT_LOGPROBS = 20
# top_k beyond the vocabulary keeps everything; the bound keeps it an int32 in the sampler's tensors.
MAX_TOP_K = 2**31 - 1
# What torch.Generator.manual_seed accepts (a negative seed is taken modulo 2**64).
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass
class SamplingParams:
    """What a request asks of the sampler and the stop logic.

    temperature 0 means greedy. `top_logprobs` is None when no logprobs are wanted, else the
    number (0..20) of alternatives per position; logprobs come from the model's raw
    log-softmax, before temperature, penalties or bias. `prompt_logprobs` likewise asks for
    the logprob of every prompt token (0..20 alternatives each); with it, `max_tokens` may be
    0: the prompt is scored and nothing is generated.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "min_tokens"):
            _check_int(name, getattr(self, name))
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive up to {MAX_TOP_K}, got {self.top_k}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not MIN_SEED <= self.seed <= MAX_SEED:
                raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for token_id in [*self.logit_bias, *self.stop_token_ids]:
            _check_int("token id", token_id)
            if token_id < 0:
                raise ValueError(f"token ids must not be negative, got {token_id}")
        for token_id, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token_id} must be in [-100, 100], got {bias}")
        if self.top_logprobs is not None and (
                isinstance(self.top_logprobs, bool) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and (
                isinstance(self.prompt_logprobs, bool) or not isinstance(self.prompt_logprobs, numbers.Integral)
                or not 0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}], got {self.prompt_logprobs!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name: str, value: object) -> None:
    # bool is an int to Python, never to a user; a float would reach an integer tensor.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
