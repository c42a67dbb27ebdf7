"""Decode steps replayed from CUDA graphs, one per batch size of a ladder, with and without LoRA.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
it is CPU-bound (about 57 µs per Triton launch, 8 µs per torch op, measured on H100:
load_tests/results/KERNELS.md). A captured graph replays them in one launch.

Every graph reads fixed device buffers. A batch of n sequences runs the graph of the
smallest captured size b >= n; rows n..b-1 are padding: slot_mapping -1 (store_kv skips
them), context length 0 (attention writes zeros), token slot -1 (no LoRA). Block tables
have a fixed width (max_model_len / block_size); entries past a row's context are never
read, so only the live part is copied in. The LoRA segment table has a fixed length per
size (`segment_capacity`); unused segments are empty base runs starting at b, which the SGMV
kernels skip (their launch depends only on b and that length, see `triton_lora.lora_apply`).

Two sets: base-only batches replay graphs that contain no LoRA kernels at all, so serving
adapters costs base traffic nothing; LoRA graphs are captured on first need and recaptured
when a LoRA slice comes alive (see engine/lora/layers.py).

Captures happen while the server runs, so other threads may be doing CUDA work at that moment
(adapter loaders page-locking host memory). A capture holds `CAPTURE_LOCK`, which every such
thread takes around its CUDA calls, and captures in thread-local mode, so a call from another
thread can never invalidate it. If a capture fails all the same, `capture_lora` drops the LoRA
graphs and moves later captures to a fresh memory pool (the old one may still be marked as
recording), and raises `CaptureFailedError`: the caller runs that step eagerly and tries again
later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from engine import placeholders
from engine.context import ForwardContext, LoraContext, set_context

log = logging.getLogger(__name__)

BATCH_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

CAPTURE_LOCK = threading.Lock()
"""Held by a graph capture, and by any other thread around CUDA calls it makes while serving."""


class CaptureFailedError(RuntimeError):
    """A LoRA graph capture failed; the graphs were reset and the step can run eagerly."""


def ladder(max_batch: int) -> list[int]:
    """Captured sizes up to `max_batch`, which is always one of them."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    return sorted({b for b in BATCH_LADDER if b < max_batch} | {max_batch})


def segment_capacity(batch: int, num_lora_slots: int) -> int:
    """Segments a batch can need (one per distinct slot, base included) plus the padding run."""
    return min(batch, num_lora_slots + 1) + 1


@dataclass
class DecodeInputs:
    """One decode step on the host, sequences already ordered by LoRA slot."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    token_slots: list[int]
    seg_bounds: list[tuple[int, int, int]]  # (start, end, slot)


class DecodeGraphs:
    """Captures and replays decode forwards (model + logits) for a ladder of batch sizes."""

    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        num_lora_slots: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.sizes = ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.num_lora_slots = num_lora_slots
        self.device = device
        b, w, s = self.max_batch, self.max_blocks, segment_capacity(self.max_batch, num_lora_slots)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(b, **i64)
        self.positions = torch.zeros(b, **i64)
        self.slot_mapping = torch.full((b,), -1, **i64)
        self.token_slots = torch.full((b,), -1, **i64)
        self.seg_starts = torch.zeros(s + 1, **i64)
        self.seg_slots = torch.full((s,), -1, **i64)
        self.context_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.full((b, w), -1, dtype=torch.int32, device=device)
        self.query_start = torch.arange(b + 1, dtype=torch.int32, device=device)
        # Pinned host mirrors: one numpy fill and one async copy per buffer each step.
        self._host_i64 = torch.zeros(6 * b + 2 * s + 1, dtype=torch.int64, pin_memory=True)
        self._host_i32 = torch.zeros(b * (w + 1), dtype=torch.int32, pin_memory=True)
        self._np_i64 = self._host_i64.numpy()
        self._np_i32 = self._host_i32.numpy()
        self._copied = torch.cuda.Event()
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._pool = None
        self._lora_pool = None  # after a failed capture: a fresh pool for the LoRA graphs
        self.lora_version: int | None = None  # live_version the LoRA graphs were captured at

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        """Capture the base-only graphs (largest first, so smaller ones reuse its memory pool)."""
        with CAPTURE_LOCK:
            for size in reversed(self.sizes):
                self._capture_one(size, False)
            torch.cuda.synchronize(self.device)

    def capture_lora(self, live_version: int) -> None:
        """(Re)capture the LoRA graphs over the LoRA slices live now (`LoRALinear.live_slices`).

        Done lazily, at the first LoRA decode step and again whenever a slice comes alive
        (`live_version` changes): rare, since slices only ever join the captured set.
        """
        self._drop_lora()
        try:
            with CAPTURE_LOCK:
                for size in reversed(self.sizes):
                    self._capture_one(size, True)
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            self._reset_after_failure()
            raise CaptureFailedError(f"LoRA decode graph capture failed: {type(exc).__name__}: {exc}") from exc
        self.lora_version = live_version
        log.info("captured LoRA decode graphs for batch sizes %s (live version %d)", self.sizes, live_version)

    def _drop_lora(self) -> None:
        for size in self.sizes:
            self._graphs.pop((size, True), None)
            self._logits.pop((size, True), None)
        self.lora_version = None

    def _reset_after_failure(self) -> None:
        """Forget the LoRA graphs and the pool a failed capture may have left recording."""
        self._drop_lora()
        pool, self._lora_pool = self._lora_pool, torch.cuda.graph_pool_handle()
        if pool is not None:
            end = getattr(torch._C, "_cuda_endAllocateToPool", None)
            if end is not None:
                # Raises if the failed capture already ended its allocation: nothing to undo then.
                with contextlib.suppress(Exception):
                    end(self.device.index if self.device.index is not None else torch.cuda.current_device(), pool)
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - a sticky device error shows again on the next step
            log.exception("device synchronize after a failed capture")

    def _reset_inputs(self) -> None:
        """Padding everywhere, so the warm-up run before a capture stores no K/V and reads none."""
        torch.cuda.synchronize(self.device)
        self.slot_mapping.fill_(-1)
        self.token_slots.fill_(-1)
        self.seg_slots.fill_(-1)
        self.seg_starts.zero_()
        self.context_lens.zero_()

    def _capture_one(self, size: int, lora: bool) -> None:
        self._reset_inputs()
        ctx = self._context(size, lora)
        set_context(ctx)
        try:
            with torch.inference_mode():
                # One eager run first: Triton compiles (and autotunes) outside the capture.
                self.model.compute_logits(self.model(self.input_ids[:size], self.positions[:size]))
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                pool = self._lora_pool if lora and self._lora_pool is not None else self._pool
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    hidden = self.model(self.input_ids[:size], self.positions[:size])
                    logits = self.model.compute_logits(hidden)
        finally:
            set_context(None)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(size, lora)] = graph
        self._logits[(size, lora)] = logits

    def _context(self, size: int, lora: bool) -> ForwardContext:
        segs = segment_capacity(size, self.num_lora_slots)
        lora_ctx = LoraContext(
            token_slots=self.token_slots[:size],
            seg_starts=self.seg_starts[: segs + 1],
            seg_slots=self.seg_slots[:segs],
            seg_bounds=[],
            any_lora=lora,
        )
        return ForwardContext(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:size],
            query_start=self.query_start[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_context_len=self.max_blocks * self.block_size,
            query_lens=[1] * size,
            context_lens_list=[self.max_blocks * self.block_size] * size,
            block_size=self.block_size,
            lora=lora_ctx,
        )

    # ------------------------------------------------------------------- replay
    def size_for(self, batch: int) -> int | None:
        """The captured size a batch of `batch` sequences runs in, or None (too big: run eagerly)."""
        if not self._graphs or batch > self.max_batch:
            return None
        return next(s for s in self.sizes if s >= batch)

    def fits(self, inputs: DecodeInputs) -> bool:
        """Whether a captured graph can run this step (batch size and block-table width)."""
        n = len(inputs.input_ids)
        return (
            self.size_for(n) is not None
            and max(len(t) for t in inputs.block_tables) <= self.max_blocks
        )

    def run(self, inputs: DecodeInputs, any_lora: bool, pending_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, vocab] for the n sequences of `inputs`, in their order (a view into the
        graph's output: valid until the next replay). Placeholder input ids are read from
        `pending_tokens` (engine/placeholders.py)."""
        n = len(inputs.input_ids)
        size = self.size_for(n)
        if size is None:
            raise ValueError(f"no captured graph holds a batch of {n}")
        if any_lora and (size, True) not in self._graphs:
            raise RuntimeError("LoRA batch but no LoRA graphs: call capture_lora first")
        self._stage(inputs, n, size)
        if pending_tokens is not None:
            ids = self.input_ids[:n]
            ids.copy_(placeholders.resolve(ids, pending_tokens))
        self._graphs[(size, any_lora)].replay()
        return self._logits[(size, any_lora)][:n]

    def _stage(self, inputs: DecodeInputs, n: int, size: int) -> None:
        segs = segment_capacity(size, self.num_lora_slots)
        if len(inputs.seg_bounds) + 1 > segs:
            raise ValueError(f"{len(inputs.seg_bounds)} LoRA segments exceed the graph's {segs - 1}")
        # The previous step's copies read these host buffers; they must have finished.
        self._copied.synchronize()
        h = self._np_i64
        h[0:n] = inputs.input_ids
        h[n:size] = 0
        h[size : size + n] = inputs.positions
        h[size + n : 2 * size] = 0
        h[2 * size : 2 * size + n] = inputs.slot_mapping
        h[2 * size + n : 3 * size] = -1
        h[3 * size : 3 * size + n] = inputs.token_slots
        h[3 * size + n : 4 * size] = -1
        o = 4 * size
        live = len(inputs.seg_bounds)
        h[o : o + live] = [start for start, _, _ in inputs.seg_bounds]
        h[o + live] = n
        h[o + live + 1 : o + segs + 1] = size
        o += segs + 1
        h[o : o + live] = [slot for _, _, slot in inputs.seg_bounds]
        h[o + live : o + segs] = -1
        width = max(len(t) for t in inputs.block_tables)
        lens = self._np_i32[:size]
        lens[:n] = inputs.context_lens
        lens[n:] = 0
        tables = self._np_i32[size : size + n * width].reshape(n, width)
        for row, table in zip(tables, inputs.block_tables, strict=True):
            row[: len(table)] = table
        src = self._host_i64
        self.input_ids[:size].copy_(src[0:size], non_blocking=True)
        self.positions[:size].copy_(src[size : 2 * size], non_blocking=True)
        self.slot_mapping[:size].copy_(src[2 * size : 3 * size], non_blocking=True)
        self.token_slots[:size].copy_(src[3 * size : 4 * size], non_blocking=True)
        self.seg_starts[: segs + 1].copy_(src[4 * size : 4 * size + segs + 1], non_blocking=True)
        self.seg_slots[:segs].copy_(src[4 * size + segs + 1 : 4 * size + 2 * segs + 1], non_blocking=True)
        src32 = self._host_i32
        self.context_lens[:size].copy_(src32[:size], non_blocking=True)
        self.block_tables[:n, :width].copy_(
            src32[size : size + n * width].view(n, width), non_blocking=True
        )
        self._copied.record()

