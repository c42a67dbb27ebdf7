"""Turn a scheduled batch of sequences into one model forward and per-sequence logits.

The batch is reordered by LoRA slot so each slot's tokens form one contiguous segment
(what SGMV/BGMV kernels want); logits come back in the caller's order.

Kernels: on CUDA (`kernels="auto"`) attention runs the Triton decode / fused prefill backend
and LoRA the Triton SGMV kernels; `kernels="torch"` (and every CPU run) uses the torch
references. After `capture_decode_graphs`, decode steps that fit a captured batch size
replay a CUDA graph (engine/cuda_graphs.py); prefill always runs eagerly.

`execute` is `run(prepare(...))`: `prepare` turns the sequences into a `StepInputs` of plain
lists (the step's description, what a tensor-parallel rank 0 sends its workers) and `run`
does the device work from it, the same on every rank.

A sequence's last token may still be on the device (engine/placeholders.py): `run` reads
those from the previous step's sampled ids (`pending_tokens`) without waiting for the host.

A prefill may also score the tokens it computes (`prompt_logprobs`, engine/prompt_logprobs.py):
for the sequences named, the logits at every computed position but the last, not only the last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from engine import placeholders
from engine.attention import set_attention_backend
from engine.context import ForwardContext, LoraContext, set_context
from engine.cuda_graphs import CaptureFailedError, DecodeGraphs, DecodeInputs
from engine.kv_cache import allocate_kv_cache, kv_budget_after_profile
from engine.lora.layers import LoRALinear
from engine.prompt_logprobs import PromptScores, score_positions
from engine.sampling_params import MAX_PROMPT_LOGPROBS
from scheduler.sequence import Sequence

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch")
_CAPTURE_RETRY_STEPS = 16
_CAPTURE_RETRY_MAX = 1024


@dataclass
class _HostBatch:
    """Everything the forward needs, as Python lists built in one pass."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    token_slots: list[int]
    seg_bounds: list[tuple[int, int, int]]
    order: list[int]  # batch position -> caller index


@dataclass
class StepInputs:
    """One forward, host side: either a decode that replays a captured graph or an eager batch."""

    is_prefill: bool
    batch: _HostBatch | None = None
    decode: DecodeInputs | None = None
    order: list[int] | None = None  # graph path: batch position -> caller index
    # (caller index, alternatives): sequences whose computed tokens are scored (prefill only)
    prompt_logprobs: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one forward produced, in the caller's order."""

    logits: torch.Tensor  # [B, vocab]: each sequence's last new token
    # caller index -> scores of that sequence's computed tokens after its first
    prompt_scores: dict[int, PromptScores] = field(default_factory=dict)


class ModelRunner:
    """Runs `model` over batches of sequences whose KV lives in the bound paged cache."""

    def __init__(
        self, model: nn.Module, block_size: int, device: torch.device | str, kernels: str = "auto"
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self.use_triton = kernels == "auto" and self.device.type == "cuda"
        self._attention_backend = "torch"
        if self.use_triton:
            from engine.kernels.cuda_attention import register_cuda_backend

            self._attention_backend = register_cuda_backend()
        self.graphs: DecodeGraphs | None = None
        self._lora_cache: list[LoRALinear] | None = None
        self.capture_failures = 0
        self._capture_backoff = 0
        self._capture_wait = 0

    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int],
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Logits [B, vocab] for the last new token of each sequence, in the order given.

        `pending_tokens`: the previous step's sampled ids on the device, which placeholder
        ids among the inputs stand for (engine/placeholders.py).
        """
        return self.run(self.prepare(seqs, num_new_tokens, is_prefill, lora_slots), pending_tokens)

    def execute_step(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int],
        pending_tokens: torch.Tensor | None = None, prompt_logprobs: list[tuple[int, int]] | None = None,
    ) -> StepOutput:  # fmt: skip
        """`execute`, and the scores of the computed tokens of the sequences in `prompt_logprobs`
        ((caller index, alternatives) pairs; prefill only)."""
        step = self.prepare(seqs, num_new_tokens, is_prefill, lora_slots, prompt_logprobs)
        return self.run_step(step, pending_tokens)

    def prepare(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int],
        prompt_logprobs: list[tuple[int, int]] | None = None,
    ) -> StepInputs:
        """The step's host-side inputs (validated), ordered by LoRA slot."""
        if not seqs:
            raise ValueError("execute needs at least one sequence")
        if not len(seqs) == len(num_new_tokens) == len(lora_slots):
            raise ValueError(
                f"seqs, num_new_tokens and lora_slots differ in length: "
                f"{len(seqs)}, {len(num_new_tokens)}, {len(lora_slots)}"
            )
        if prompt_logprobs:
            _check_prompt_logprobs(prompt_logprobs, len(seqs), is_prefill)
        graphs = self.graphs
        if not is_prefill and graphs is not None and graphs.size_for(len(seqs)) is not None:
            inputs, order = self._build_decode(seqs, num_new_tokens, lora_slots)
            if graphs.fits(inputs):
                return StepInputs(is_prefill=False, decode=inputs, order=order)
        batch = self._build(seqs, num_new_tokens, is_prefill, lora_slots)
        return StepInputs(is_prefill, batch=batch, prompt_logprobs=list(prompt_logprobs or []))

    def run(self, step: StepInputs, pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the forward `step` describes; logits [B, vocab] in the caller's order."""
        return self.run_step(step, pending_tokens).logits

    def run_step(self, step: StepInputs, pending_tokens: torch.Tensor | None = None) -> StepOutput:
        """Run the forward `step` describes: its logits and the scores it asked for."""
        self._select_kernels()
        if step.decode is not None:
            if self.graphs is None or step.order is None:
                raise RuntimeError("a graph decode step reached a runner without captured graphs")
            return StepOutput(self._decode_from_graph(self.graphs, step.decode, step.order, pending_tokens))
        batch, is_prefill = step.batch, step.is_prefill
        if batch is None:
            raise ValueError("the step has neither a batch nor graph decode inputs")
        ctx = self._context(batch, is_prefill)
        input_ids = self._to_device(batch.input_ids, torch.long)
        if pending_tokens is not None:
            input_ids = placeholders.resolve(input_ids, pending_tokens)
        positions = self._to_device(batch.positions, torch.long)
        last_index = self._to_device([end - 1 for end in batch.query_start[1:]], torch.long)
        inverse = [0] * len(batch.order)
        for pos, caller_index in enumerate(batch.order):
            inverse[caller_index] = pos
        unpermute = self._to_device(inverse, torch.long)
        set_context(ctx)
        try:
            with torch.inference_mode():
                hidden = self.model(input_ids, positions)
                logits = self.model.compute_logits(hidden.index_select(0, last_index))
                scores = {}
                for caller_index, k in step.prompt_logprobs:
                    pos = inverse[caller_index]
                    start, end = batch.query_start[pos], batch.query_start[pos + 1]
                    scores[caller_index] = score_positions(self.model.compute_logits, hidden[start : end - 1],
                                                           input_ids[start + 1 : end], k, logits.shape[1])
                return StepOutput(logits.index_select(0, unpermute), scores)
        finally:
            set_context(None)

    # ------------------------------------------------------------- GPU set-up
    def kv_cache_budget(self, utilization: float, max_num_batched_tokens: int, max_model_len: int,
                        max_num_seqs: int) -> int:
        """Bytes the KV pool may take on this CUDA device, measured after a warm-up forward.

        Runs the largest prefill the scheduler can send (`max_num_batched_tokens` tokens in
        sequences of `max_model_len`) and the logits of `max_num_seqs` rows, records the peak,
        and leaves `utilization` of the device for weights, LoRA slots, that peak and the pool.
        """
        if self.device.type != "cuda":
            raise ValueError("kv_cache_budget measures a CUDA device")
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward(max_num_batched_tokens, max_model_len, max_num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return kv_budget_after_profile(self.device, utilization, peak)

    def _profile_forward(self, num_tokens: int, max_len: int, num_seqs: int) -> None:
        lengths = [max_len] * (num_tokens // max_len)
        if num_tokens % max_len:
            lengths.append(num_tokens % max_len)
        seqs = []
        for i, n in enumerate(lengths):
            seq = Sequence(seq_id=-1 - i, prompt_token_ids=[0] * n, max_tokens=1)
            seq.block_table = list(range(-(-n // self.block_size)))
            seqs.append(seq)
        # run(prepare()), not execute(): under tensor parallelism every rank profiles itself.
        # The longest sequence is scored too: prompt logprobs add their chunks to the peak.
        self.run(self.prepare(seqs, lengths, True, [-1] * len(seqs), [(0, MAX_PROMPT_LOGPROBS)]))
        hidden_size = self.model.config.hidden_size
        with torch.inference_mode():
            hidden = torch.zeros(num_seqs, hidden_size, device=self.device, dtype=self._dtype())
            # The sampler keeps a few float32 copies of the step's logits.
            logits = self.model.compute_logits(hidden).float()
            logits.log_softmax(dim=-1).add_(logits.clone())

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """Create the paged KV pool on this runner's device and bind it to the model."""
        allocate_kv_cache(self.model, num_blocks, self.block_size, dtype, self.device)

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture decode graphs for batch sizes up to `max_batch` (KV caches must be bound)."""
        if not self.use_triton:
            raise ValueError("CUDA graphs need the CUDA kernels (device cuda, kernels='auto')")
        self._select_kernels()
        lora = self._lora_modules()
        graphs = DecodeGraphs(
            self.model, self.block_size, max_batch, max_model_len,
            lora[0].num_slots if lora else 1, self.device,
        )  # fmt: skip
        graphs.capture()
        self.graphs = graphs

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _lora_modules(self) -> list[LoRALinear]:
        if not self._lora_cache:  # an empty list is looked up again: LoRA may wrap the model later
            self._lora_cache = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        return self._lora_cache

    def _select_kernels(self) -> None:
        # The backend table is process-wide and LoRA layers carry their own switch: set both
        # so runners of different kernels over one model (the tests' oracle) never mix.
        set_attention_backend(self._attention_backend)
        if getattr(self.model, "_quiver_use_triton", None) is not self.use_triton:
            for module in self._lora_modules():
                module.use_triton = self.use_triton
            self.model._quiver_use_triton = self.use_triton

    # -------------------------------------------------------------- graph path
    def _decode_from_graph(
        self, graphs: DecodeGraphs, inputs: DecodeInputs, order: list[int], pending_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        any_lora = any(slot >= 0 for _, _, slot in inputs.seg_bounds)
        if any_lora and not self._lora_graphs_ready(graphs):
            return self.run(StepInputs(False, batch=_eager_batch(inputs, order)), pending_tokens)
        logits = graphs.run(inputs, any_lora, pending_tokens)
        if order == list(range(len(order))):
            return logits
        inverse = [0] * len(order)
        for pos, caller_index in enumerate(order):
            inverse[caller_index] = pos
        return logits.index_select(0, self._to_device(inverse, torch.long))

    def _lora_graphs_ready(self, graphs: DecodeGraphs) -> bool:
        """Capture the LoRA graphs if the live slices changed; False (run eagerly) if that failed.

        After a failure the capture is retried only after `_CAPTURE_RETRY_STEPS` LoRA decode
        steps, doubling up to `_CAPTURE_RETRY_MAX`, so a lasting cause costs little."""
        version = sum(m.live_version for m in self._lora_modules())
        if graphs.lora_version == version:
            return True
        if self._capture_wait > 0:
            self._capture_wait -= 1
            return False
        try:
            graphs.capture_lora(version)
        except CaptureFailedError:
            log.exception("LoRA graph capture failed; decoding eagerly for now")
            self.capture_failures += 1
            self._capture_backoff = min(_CAPTURE_RETRY_MAX, max(_CAPTURE_RETRY_STEPS, 2 * self._capture_backoff))
            self._capture_wait = self._capture_backoff
            return False
        self._capture_backoff = 0
        return True

    def _build_decode(
        self, seqs: list[Sequence], num_new_tokens: list[int], lora_slots: list[int]
    ) -> tuple[DecodeInputs, list[int]]:
        """The decode step's host inputs in slot order, in one lean pass (this runs every step)."""
        bs = self.block_size
        order = sorted(range(len(seqs)), key=lora_slots.__getitem__)
        d = DecodeInputs([], [], [], [], [], [], [])
        seg_bounds = d.seg_bounds
        for pos_in_batch, i in enumerate(order):
            seq, slot = seqs[i], lora_slots[i]
            if num_new_tokens[i] != 1:
                raise ValueError(f"sequence {seq.seq_id}: a decode step computes 1 token, got {num_new_tokens[i]}")
            if slot < -1:
                raise ValueError(f"sequence {seq.seq_id}: LoRA slot must be -1 (base) or >= 0, got {slot}")
            table = seq.block_table
            pos = seq.num_tokens - 1
            block, offset = divmod(pos, bs)
            if block >= len(table):
                raise RuntimeError(
                    f"sequence {seq.seq_id} holds {len(table)} blocks of {bs}, needs {pos + 1} tokens"
                )
            d.input_ids.append(seq.last_token_id)
            d.positions.append(pos)
            d.slot_mapping.append(table[block] * bs + offset)
            d.context_lens.append(pos + 1)
            d.block_tables.append(table)
            d.token_slots.append(slot)
            if seg_bounds and seg_bounds[-1][2] == slot:
                seg_bounds[-1] = (seg_bounds[-1][0], pos_in_batch + 1, slot)
            else:
                seg_bounds.append((pos_in_batch, pos_in_batch + 1, slot))
        return d, order

    # -------------------------------------------------------------- eager path
    def _build(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int]
    ) -> _HostBatch:
        bs = self.block_size
        # Stable sort: sequences of one slot keep their relative order.
        order = sorted(range(len(seqs)), key=lambda i: lora_slots[i])
        b = _HostBatch([], [], [], [0], [], [], [], [], [], order)
        for i in order:
            seq, n, slot = seqs[i], num_new_tokens[i], lora_slots[i]
            if slot < -1:
                raise ValueError(f"sequence {seq.seq_id}: LoRA slot must be -1 (base) or >= 0, got {slot}")
            if is_prefill:
                start = seq.num_computed_tokens
                if n < 1 or start + n > seq.num_tokens:
                    raise ValueError(
                        f"sequence {seq.seq_id}: cannot compute {n} tokens from {start} of {seq.num_tokens}"
                    )
                b.input_ids.extend(seq.token_ids[start : start + n])
            else:
                if n != 1:
                    raise ValueError(f"sequence {seq.seq_id}: a decode step computes 1 token, got {n}")
                start = seq.num_tokens - 1
                b.input_ids.append(seq.last_token_id)
            end = start + n
            if len(seq.block_table) * bs < end:
                raise RuntimeError(
                    f"sequence {seq.seq_id} holds {len(seq.block_table)} blocks of {bs}, needs {end} tokens"
                )
            b.positions.extend(range(start, end))
            b.slot_mapping.extend(_slots(seq.block_table, start, end, bs))
            b.query_start.append(b.query_start[-1] + n)
            b.query_lens.append(n)
            b.context_lens.append(end)
            b.block_tables.append(seq.block_table)
            b.token_slots.extend([slot] * n)
            tok_start = b.query_start[-2]
            if b.seg_bounds and b.seg_bounds[-1][2] == slot:
                b.seg_bounds[-1] = (b.seg_bounds[-1][0], tok_start + n, slot)
            else:
                b.seg_bounds.append((tok_start, tok_start + n, slot))
        return b

    def _context(self, b: _HostBatch, is_prefill: bool) -> ForwardContext:
        width = max(len(t) for t in b.block_tables)
        tables = [t + [-1] * (width - len(t)) for t in b.block_tables]
        seg_starts = [start for start, _, _ in b.seg_bounds] + [b.seg_bounds[-1][1]]
        lora = LoraContext(
            token_slots=self._to_device(b.token_slots, torch.long),
            seg_starts=self._to_device(seg_starts, torch.long),
            seg_slots=self._to_device([slot for _, _, slot in b.seg_bounds], torch.long),
            seg_bounds=b.seg_bounds,
            any_lora=any(slot >= 0 for _, _, slot in b.seg_bounds),
        )
        return ForwardContext(
            is_prefill=is_prefill,
            slot_mapping=self._to_device(b.slot_mapping, torch.long),
            query_start=self._to_device(b.query_start, torch.int32),
            context_lens=self._to_device(b.context_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            max_query_len=max(b.query_lens),
            max_context_len=max(b.context_lens),
            query_lens=b.query_lens,
            context_lens_list=b.context_lens,
            block_size=self.block_size,
            lora=lora,
        )

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)


def _check_prompt_logprobs(wanted: list[tuple[int, int]], num_seqs: int, is_prefill: bool) -> None:
    if not is_prefill:
        raise ValueError("prompt logprobs are computed by a prefill step, not a decode step")
    for index, k in wanted:
        if not 0 <= index < num_seqs or not 0 <= k <= MAX_PROMPT_LOGPROBS:
            raise ValueError(f"prompt logprobs for sequence {index} with {k} alternatives: "
                             f"the batch has {num_seqs} sequences, alternatives are 0..{MAX_PROMPT_LOGPROBS}")


def _eager_batch(d: DecodeInputs, order: list[int]) -> _HostBatch:
    """The eager form of a graph decode step (same rows, same slot order)."""
    n = len(d.input_ids)
    return _HostBatch(
        input_ids=d.input_ids, positions=d.positions, slot_mapping=d.slot_mapping,
        query_start=list(range(n + 1)), query_lens=[1] * n, context_lens=d.context_lens,
        block_tables=d.block_tables, token_slots=d.token_slots, seg_bounds=d.seg_bounds, order=order,
    )  # fmt: skip


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end), walking whole blocks at a time."""
    out: list[int] = []
    pos = start
    while pos < end:
        block, offset = divmod(pos, block_size)
        stop = min(end, (block + 1) * block_size)
        base = block_table[block] * block_size
        out.extend(range(base + offset, base + offset + stop - pos))
        pos = stop
    return out
