"""Turn one step's logits into one token per sequence, plus raw logprobs when asked.

Order of work (per row, vectorized over the batch):
  1. raw logprobs = log_softmax(logits), kept for the response (before anything below);
  2. repetition penalty (HF semantics: prompt and output tokens; positive logits divided,
     negative ones multiplied);
  3. frequency and presence penalties (OpenAI semantics, output tokens only);
  4. logit_bias (added);
  5. min_tokens: EOS and stop token ids set to -inf while the output is too short;
     then logits processors: grammar rows' allowed-token bitmasks, all applied at once on the
     device (`BitmaskLogitsProcessor`), and any other processor on its own row;
  6. greedy rows take the argmax; the others are divided by their temperature, cut by
     top_k then top_p (one sort for all rows), and drawn by an exponential race.

The exponential race (argmax of probs / q, q ~ Exp(1)) samples exactly from probs and lets
each seeded row draw its noise from its own generator, so a seeded request produces the
same tokens alone or in any batch, at any position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from engine.logits_processor import BitmaskLogitsProcessor, LogitsProcessor
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class SamplerInput:
    """One row of the batch: a sequence's parameters and the tokens it has seen."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # seeded requests only; on the logits' device
    eos_token_ids: list[int]  # suppressed, with params.stop_token_ids, below min_tokens
    logits_processor: LogitsProcessor | None = None  # constrained decoding; applied last


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where params.top_logprobs is None


class PendingSample:
    """A step's sampled tokens (and the logprobs rows asked for) on their way to the host.

    `token_ids` stays on the device, so the next step can read its input ids from it before
    the host has them; `result()` waits for this step's copies and builds the SamplerOutput.
    Everything crosses in two transfers (ints, floats), not one per row.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        rows: list[SamplerInput],
        top_ids: torch.Tensor | None = None,
        floats: torch.Tensor | None = None,
        wanted: list[int] | None = None,
        k: int = 0,
    ) -> None:
        self.token_ids = token_ids
        self._rows = rows
        self._wanted = wanted or []
        self._k = k
        on_cuda = token_ids.is_cuda
        ints = token_ids if top_ids is None else torch.cat([token_ids, top_ids.flatten()])
        self._ints = to_host(ints, on_cuda)
        self._floats = None if floats is None else to_host(floats, on_cuda)
        self._ready: torch.cuda.Event | None = None
        if on_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    @classmethod
    def launch(cls, logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerInput]) -> PendingSample:
        """Queue the raw log-softmax work for the rows that asked, then the copies to the host."""
        wanted = [i for i, row in enumerate(rows) if row.params.top_logprobs is not None]
        if not wanted:
            return cls(tokens, rows)
        index = _ints(wanted, logits.device)
        logprobs = logits.index_select(0, index).log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, index).unsqueeze(1))
        k = min(max(rows[i].params.top_logprobs or 0 for i in wanted), logits.shape[1])
        top_values, top_ids = logprobs.topk(k, dim=-1)  # sorted descending
        return cls(tokens, rows, top_ids, torch.cat([chosen, top_values], dim=1), wanted, k)

    def result(self) -> SamplerOutput:
        """Wait for this step's copies (not for work queued after them) and unpack them."""
        if self._ready is not None:
            self._ready.synchronize()
        rows, k = self._rows, self._k
        ints = self._ints.tolist()
        token_ids = ints[: len(rows)]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if self._floats is not None:
            floats = self._floats.tolist()
            top_flat = ints[len(rows) :]
            for j, i in enumerate(self._wanted):
                n = min(rows[i].params.top_logprobs or 0, k)
                top = list(zip(top_flat[j * k : j * k + n], floats[j][1 : 1 + n], strict=True))
                result[i] = TokenLogprob(token_id=token_ids[i], logprob=floats[j][0], top=top)
        return SamplerOutput(token_ids=token_ids, logprobs=result)


def to_host(t: torch.Tensor, on_cuda: bool) -> torch.Tensor:
    """`t` on the host: on CUDA a page-locked copy queued on the stream (wait on an event first)."""
    if not on_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplerInput]) -> SamplerOutput:
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: list[SamplerInput]) -> PendingSample:
        """Queue the step's sampling on the logits' device without waiting for it: the tokens
        stay on the device (`PendingSample.token_ids`) until `result()` is asked for."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        tokens = sample_tokens(process_logits(logits, rows), rows)
        return PendingSample.launch(logits, tokens, rows)


def process_logits(logits: torch.Tensor, rows: list[SamplerInput]) -> torch.Tensor:
    """Penalties, bias, min_tokens suppression and logits processors, in that order, on a
    float32 copy.

    Returns logits before temperature, top-k and top-p; the input is left untouched.
    """
    out = logits.to(torch.float32, copy=True)
    vocab = out.shape[1]
    _apply_repetition_penalty(out, rows)
    _apply_frequency_presence(out, rows)
    bias_rows, bias_ids, bias_values = [], [], []
    ban_rows, ban_ids = [], []
    for i, row in enumerate(rows):
        # Ids outside the model's vocabulary cannot be sampled anyway: the server rejects
        # them against the tokenizer; here they are skipped rather than failing the batch.
        for token_id, bias in row.params.logit_bias.items():
            if 0 <= token_id < vocab:
                bias_rows.append(i)
                bias_ids.append(token_id)
                bias_values.append(bias)
        if len(row.output_token_ids) < row.params.min_tokens:
            for token_id in (*row.eos_token_ids, *row.params.stop_token_ids):
                if 0 <= token_id < vocab:
                    ban_rows.append(i)
                    ban_ids.append(token_id)
    if bias_rows:
        index = (_ints(bias_rows, out.device), _ints(bias_ids, out.device))
        out.index_put_(index, torch.tensor(bias_values, dtype=out.dtype, device=out.device), accumulate=True)
    if ban_rows:
        out[_ints(ban_rows, out.device), _ints(ban_ids, out.device)] = float("-inf")
    masked = [(i, row.logits_processor) for i, row in enumerate(rows) if _has_bitmask(row.logits_processor)]
    if masked:
        _apply_bitmasks(out, masked)
    for row_logits, row in zip(out, rows, strict=True):
        if row.logits_processor is not None and not _has_bitmask(row.logits_processor):
            row.logits_processor.apply(row_logits)  # a view: edits land in `out`
    return out


def _has_bitmask(processor: LogitsProcessor | None) -> bool:
    return processor is not None and hasattr(processor, "fill_bitmask")


def _apply_bitmasks(out: torch.Tensor, masked: list[tuple[int, BitmaskLogitsProcessor]]) -> None:
    """Every grammar row's allowed-token mask, filled on the host into one int32 array, crosses
    in one copy and masks its row on the device; tokens past a mask's width are never allowed."""
    words = max(processor.bitmask_words for _, processor in masked)
    host = torch.zeros(len(masked), words, dtype=torch.int32, pin_memory=out.is_cuda)
    for j, (_, processor) in enumerate(masked):
        processor.fill_bitmask(host, j)
    bits = host.to(out.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=out.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [rows, words * 32]
    vocab = out.shape[1]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = _ints([i for i, _ in masked], out.device)
    out.index_copy_(0, index, out.index_select(0, index).masked_fill_(~allowed[:, :vocab], float("-inf")))


def sample_tokens(logits: torch.Tensor, rows: list[SamplerInput]) -> torch.Tensor:
    """One token per row from processed logits: argmax for greedy rows, a draw otherwise."""
    tokens = logits.argmax(dim=-1)  # first maximum on ties: greedy is the lowest id
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not random_rows:
        return tokens
    device = logits.device
    index = _ints(random_rows, device)
    sub = logits.index_select(0, index)
    temperature = torch.tensor([rows[i].params.temperature for i in random_rows], device=device)
    sub.div_(temperature.unsqueeze(1))
    top_k = [rows[i].params.top_k for i in random_rows]
    top_p = [rows[i].params.top_p for i in random_rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sub = _top_k_top_p(sub, _ints(top_k, device), torch.tensor(top_p, device=device))
    probs = sub.softmax(dim=-1)
    tokens[index] = _exponential_race(probs, [rows[i].generator for i in random_rows])
    return tokens


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SamplerInput]) -> None:
    chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not chosen:
        return
    seen = _presence_mask(logits, [rows[i].prompt_token_ids + rows[i].output_token_ids for i in chosen])
    index = _ints(chosen, logits.device)
    sub = logits.index_select(0, index)
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in chosen], device=logits.device)
    penalty = penalty.unsqueeze(1)
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[index] = torch.where(seen, penalized, sub)


def _apply_frequency_presence(logits: torch.Tensor, rows: list[SamplerInput]) -> None:
    chosen = [
        i
        for i, row in enumerate(rows)
        if (row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0)
        and row.output_token_ids
    ]
    if not chosen:
        return
    counts = _token_counts(logits, [rows[i].output_token_ids for i in chosen])
    device = logits.device
    freq = torch.tensor([rows[i].params.frequency_penalty for i in chosen], device=device).unsqueeze(1)
    pres = torch.tensor([rows[i].params.presence_penalty for i in chosen], device=device).unsqueeze(1)
    index = _ints(chosen, device)
    logits[index] = logits.index_select(0, index) - (freq * counts + pres * (counts > 0).float())


def _token_counts(logits: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
    """[len(token_lists), vocab] float32 counts, built with one index_add over the flat ids.

    The flat index is built on the host with numpy (several times faster than torch.tensor
    on Python lists) and crosses to the device in one copy.
    """
    vocab = logits.shape[1]
    lengths = np.fromiter((len(tokens) for tokens in token_lists), dtype=np.int64, count=len(token_lists))
    ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    # Ids outside the vocabulary land in an extra column that is dropped afterwards.
    ids[(ids < 0) | (ids >= vocab)] = vocab
    flat = np.repeat(np.arange(len(token_lists), dtype=np.int64) * (vocab + 1), lengths) + ids
    index = torch.from_numpy(flat).to(logits.device)
    counts = torch.zeros(len(token_lists) * (vocab + 1), dtype=torch.float32, device=logits.device)
    counts.index_add_(0, index, torch.ones(len(flat), dtype=torch.float32, device=logits.device))
    return counts.view(len(token_lists), vocab + 1)[:, :vocab]


def _presence_mask(logits: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
    return _token_counts(logits, token_lists) > 0


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top_k, then outside its top_p nucleus.

    top_k 0 keeps the whole vocabulary; top_p applies to the distribution left by top_k
    and keeps the smallest prefix whose mass reaches top_p (never fewer than one token).
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut = (mass_before >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1.0)
    cut[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    noise = torch.empty_like(probs)
    unseeded = [i for i, gen in enumerate(generators) if gen is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    else:
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        if unseeded:
            index = _ints(unseeded, probs.device)
            noise[index] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    # A zero draw would turn a masked token (prob 0) into 0/0 = NaN, which argmax prefers.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
