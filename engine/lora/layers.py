"""`LoRALinear`: a fused base projection plus preallocated per-slot LoRA buffers, wrapped from outside.

The model never knows LoRA exists: `LoraSlots` swaps each projection for a `LoRALinear`, whose
forward adds the adapters' deltas chosen by the current step's `LoraContext`. Buffers are
allocated once (`num_slots` x `max_rank`), so loading an adapter is a copy, never an allocation,
and every slot has the same shape, which is what the segmented/gathered kernels need.

On CUDA the deltas come from the Triton SGMV kernels (`engine.kernels.triton_lora.lora_apply`),
whose launch depends only on the token count and the segment-table length, so a decode step
can be captured in a CUDA graph; batches of at most `SMALL_BATCH_TOKENS` tokens (decode at
small batch) instead take one launch for all live slices of the layer
(`engine.kernels.triton_lora_decode`). On the CPU (or with `use_triton = False`) the deltas
come from the torch reference. Each slice keeps an int32 rank per slot so the kernels skip the
zero padding of adapters smaller than `max_rank`.

Slices no loaded adapter targets are skipped (`live_slices`): an engine serving q/k/v/o
adapters launches no kernels for gate_up/down. A CUDA graph bakes in the slices live when it
was captured, so `live_version` grows whenever a slice comes alive, and the model runner
recaptures its LoRA graphs when the sum over layers changes. A slice that dies stays in the
old graphs and adds exact zeros (rank 0 in every slot), so it needs no recapture.

Under tensor parallelism the buffers hold this rank's shard of each adapter (`LoraSlots.load`
slices it with the base layer's `shard_lora`); on a row-parallel base the delta is added to
the partial output before the all-reduce (engine/models/parallel.py gives the math).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from engine.context import LoraContext, get_context, get_lora_context
from engine.kernels.lora_ref import lora_bgmv, lora_shrink_expand_sgmv
from engine.lora import slot_plan
from engine.lora.slot_plan import flat_source


@dataclass
class SlotWrite:
    """The device work of loading one adapter into a slot: zero the slot, copy the adapter's A and B
    (from page-locked host memory the copies are queued, not waited for), set its ranks."""

    zeros: list[torch.Tensor] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (destination, source)
    ranks: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)  # (rank tensor, slot, rank)

    def extend(self, other: SlotWrite) -> None:
        self.zeros += other.zeros
        self.copies += other.copies
        self.ranks += other.ranks

    @torch.no_grad()
    def apply(self) -> None:
        if self.zeros:
            torch._foreach_zero_(self.zeros)
        staged = _staged_sources(self.copies)
        if staged is not None:
            torch._foreach_copy_([dst for dst, _ in self.copies], staged)
        else:
            for dst, src in self.copies:
                dst.copy_(src, non_blocking=src.device.type == "cpu" and src.is_pinned())
        for ranks, slot, rank in self.ranks:
            ranks[slot] = rank


def _staged_sources(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor] | None:
    """When every source is a view of one page-locked buffer (`adapters.loader.pin_all`) and the
    destinations are on a CUDA device: that buffer in one host-to-device copy, and each source as
    a view of the device copy. Hundreds of small copies then cost one DMA and one batched call."""
    if not copies or not copies[0][0].is_cuda:
        return None
    base = flat_source([src for _, src in copies])
    if base is None or base.device.type != "cpu" or not base.is_pinned():
        return None
    # Bigger adapters are copied tensor by tensor: a load never needs a large free block of device memory.
    if base.numel() * base.element_size() > slot_plan.STAGE_MAX_BYTES:
        return None
    if any(src.dtype != dst.dtype for dst, src in copies):
        return None
    device_copy = base.to(copies[0][0].device, non_blocking=True)
    origin = base.storage_offset()
    return [device_copy.as_strided(src.shape, src.stride(), src.storage_offset() - origin) for _, src in copies]


class LoRALinear(nn.Module):
    """Wraps a fused linear (`.weight` [out, in], `.output_sizes`); one A/B stack per output slice.

    a_stacks[i]: [num_slots, max_rank, in]        b_stacks[i]: [num_slots, output_sizes[i], max_rank]
    ranks[i]:    [num_slots] int32, the rank loaded into each slot for slice i (0: not targeted)
    The A stacks are views into one buffer `lora_a` [num_slots, slices * max_rank, in]: every
    slice reads the same x, so on CUDA one shrink serves all live slices of a fused layer (q, k
    and v: 1 shrink + 3 expands instead of 3 + 3 launches).
    `use_triton` picks the kernels; the model runner sets it (True by default on CUDA).
    """

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int) -> None:
        super().__init__()
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots} and {max_rank}")
        self.base_layer = base_layer
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.output_sizes: list[int] = list(base_layer.output_sizes)
        if sum(self.output_sizes) != self.out_features:
            raise ValueError(
                f"output_sizes {self.output_sizes} do not sum to out_features {self.out_features}"
            )
        weight = base_layer.weight
        num_slices = len(self.output_sizes)
        # Not persistent: these are runtime slots, not part of the model's checkpoint.
        a = torch.zeros(num_slots, num_slices * max_rank, self.in_features, device=weight.device, dtype=weight.dtype)
        self.register_buffer("lora_a", a, persistent=False)
        for i, size in enumerate(self.output_sizes):
            b = torch.zeros(num_slots, size, max_rank, device=weight.device, dtype=weight.dtype)
            self.register_buffer(f"lora_b_{i}", b, persistent=False)
            rank = torch.zeros(num_slots, device=weight.device, dtype=torch.int32)
            self.register_buffer(f"lora_rank_{i}", rank, persistent=False)
        self.use_triton = weight.is_cuda
        # A row-parallel base (engine/models/parallel.py) sums partial outputs over ranks; the
        # delta of this rank's input shard must join its partial output before that sum.
        self._row_parallel = bool(getattr(base_layer, "reduces_output", False))
        self._slice_slots: list[set[int]] = [set() for _ in self.output_sizes]  # slots targeting slice i
        self.live_slices: list[int] = []
        self.live_version = 0
        # DoRA (`set_dora`): per slot, s - 1 for every output column, s = m / ||W + BA||_row; row
        # `num_slots` (index -1: base tokens) stays zero. Allocated on the first DoRA adapter.
        self.dora_shift: torch.Tensor | None = None
        self._dora_slots: set[int] = set()
        self._w_row_sq: torch.Tensor | None = None  # ||W_row||^2 in float32, computed once

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def a_stacks(self) -> list[torch.Tensor]:
        # Looked up each time so `.to(device)` (which replaces buffers) is always reflected.
        r = self.max_rank
        return [self.lora_a[:, i * r : (i + 1) * r] for i in range(len(self.output_sizes))]

    @property
    def b_stacks(self) -> list[torch.Tensor]:
        return [getattr(self, f"lora_b_{i}") for i in range(len(self.output_sizes))]

    @property
    def ranks(self) -> list[torch.Tensor]:
        return [getattr(self, f"lora_rank_{i}") for i in range(len(self.output_sizes))]

    @property
    def slice_offsets(self) -> list[int]:
        offsets = [0]
        for size in self.output_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        return offsets

    @torch.no_grad()
    def set_lora(self, slot: int, slice_weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Copy one adapter into `slot`: per output slice, (A [r, in], B [out_i, r]) or None (not targeted)."""
        self.plan_lora(slot, slice_weights).apply()

    def plan_lora(self, slot: int, slice_weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> SlotWrite:
        """Validate one adapter for `slot` and mark its live slices; the device work is returned, so
        that `LoraSlots.load` can do every layer's at once (a few batched calls, not ~1000 ops)."""
        self._check_slot(slot)
        if len(slice_weights) != len(self.output_sizes):
            raise ValueError(f"expected {len(self.output_sizes)} slices, got {len(slice_weights)}")
        for i, pair in enumerate(slice_weights):
            if pair is not None:
                self._check_pair(i, *pair)
        write = SlotWrite()
        write.zeros.append(self.lora_a[slot])  # every slice's A
        for i, (a_stack, b_stack, ranks, pair) in enumerate(
            zip(self.a_stacks, self.b_stacks, self.ranks, slice_weights, strict=True)
        ):
            write.zeros.append(b_stack[slot])
            write.ranks.append((ranks, slot, 0 if pair is None else pair[0].shape[0]))
            self._mark(i, slot, pair is not None)
            if pair is not None:
                a, b = pair
                rank = a.shape[0]
                write.copies.append((a_stack[slot, :rank], a))
                write.copies.append((b_stack[slot, :, :rank], b))
        return write

    @torch.no_grad()
    def reset_lora(self, slot: int) -> None:
        self._check_slot(slot)
        for i, (a_stack, b_stack, ranks) in enumerate(zip(self.a_stacks, self.b_stacks, self.ranks, strict=True)):
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            ranks[slot] = 0
            self._mark(i, slot, False)
        self.clear_dora(slot)

    @torch.no_grad()
    def set_dora(self, slot: int, slice_weights: list[tuple[torch.Tensor, torch.Tensor] | None],
                 magnitudes: list[torch.Tensor | None]) -> None:  # fmt: skip
        """Make `slot` a DoRA slot: per slice with a magnitude m, its output columns are scaled by
        s = m / ||W_i + B_i A_i||_row (B with the scale folded in), as PEFT's DoRA computes them.

        The norm comes from ||W||^2 + 2 (W A^T) . B + B (A A^T) . B per row, in float32, so no
        [out, in] temporary is made. Slices without a magnitude keep s = 1."""
        self._check_slot(slot)
        if self.dora_shift is None:
            w = self.weight
            self.dora_shift = torch.zeros(self.num_slots + 1, self.out_features, device=w.device, dtype=w.dtype)
        if self._w_row_sq is None:
            self._w_row_sq = torch.linalg.vector_norm(self.weight, dim=1, dtype=torch.float32) ** 2
        shift = torch.zeros(self.out_features, device=self.dora_shift.device, dtype=torch.float32)
        for i, (pair, m) in enumerate(zip(slice_weights, magnitudes, strict=True)):
            if pair is None or m is None:
                continue
            lo, n = self.slice_offsets[i], self.output_sizes[i]
            a, b = (t.to(device=shift.device, dtype=torch.float32) for t in pair)
            w = self.weight[lo : lo + n]
            wa = (w @ pair[0].to(device=w.device, dtype=w.dtype).T).float()  # [out_i, r]
            norm_sq = self._w_row_sq[lo : lo + n] + 2 * (wa * b).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
            shift[lo : lo + n] = m.to(shift.device) / norm_sq.clamp_min(0).sqrt() - 1
        self.dora_shift[slot].copy_(shift)
        if not self._dora_slots:
            self.live_version += 1  # captured graphs lack the DoRA scaling: recapture
        self._dora_slots.add(slot)

    @torch.no_grad()
    def clear_dora(self, slot: int) -> None:
        if slot in self._dora_slots:
            self._dora_slots.discard(slot)
            self.dora_shift[slot].zero_()  # graphs captured with the scaling now add exact zeros

    def _mark(self, index: int, slot: int, targeted: bool) -> None:
        users = self._slice_slots[index]
        was_live = bool(users)
        if targeted:
            users.add(slot)
        else:
            users.discard(slot)
        if bool(users) != was_live:
            self.live_slices = [i for i, u in enumerate(self._slice_slots) if u]
            if not was_live:
                self.live_version += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._row_parallel:
            base = self.base_layer
            return base.reduce(self._add_lora(x, base.forward_partial(x)))
        return self._add_lora(x, self.base_layer(x))

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base output for `x`) plus each token's adapter delta, in place; then DoRA's
        per-column scaling for the tokens of DoRA slots."""
        lora = get_lora_context()
        if lora is None or not lora.any_lora:
            return y
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)
        self._add_deltas(x2, y2, lora)
        if self._dora_slots:
            self._scale_dora(y2, lora)
        return y

    def _scale_dora(self, y2: torch.Tensor, lora: LoraContext) -> None:
        """y <- y + (s - 1)(y - bias) = bias + s (W x + delta) for each token of a DoRA slot.
        Other tokens have s - 1 = 0 exactly, so their rows are unchanged bit for bit."""
        bias = self.bias
        if get_context().is_prefill:  # eager: per segment, no [tokens, out] temporary
            for start, end, slot in lora.seg_bounds:
                if slot in self._dora_slots:
                    rows = y2[start:end]
                    rows.addcmul_(self.dora_shift[slot], rows if bias is None else rows - bias)
            return
        shift = self.dora_shift[lora.token_slots.long()]  # decode (maybe in a graph): base tokens read row -1
        y2.addcmul_(shift, y2 if bias is None else y2 - bias)

    def _add_deltas(self, x2: torch.Tensor, y2: torch.Tensor, lora: LoraContext) -> None:
        a_stacks, b_stacks, offsets = self.a_stacks, self.b_stacks, self.slice_offsets
        if self.use_triton and x2.is_cuda:
            kernels, ranks, r = _triton_lora(), self.ranks, self.max_rank
            live = self.live_slices
            if x2.shape[0] <= SMALL_BATCH_TOKENS and r <= _SMALL_MAX_RANK:
                # Decode-sized batch: every live slice in one launch, no h buffer, no memset.
                _triton_lora_decode().lora_fused_small(
                    y2, x2, self.lora_a, b_stacks, ranks, offsets, live, lora.token_slots
                )
            elif len(live) > 1 and len(self.output_sizes) * r <= _MAX_FUSED_RANK:
                # One shrink over every slice's A (padding rows read as zeros), one expand each.
                h = kernels.lora_shrink(x2, self.lora_a, lora)
                for i in live:
                    kernels.lora_expand(h[:, i * r : (i + 1) * r], b_stacks[i], lora, y2, offsets[i], ranks[i])
            else:
                for i in live:
                    kernels.lora_apply(y2, x2, a_stacks[i], b_stacks[i], lora, offsets[i], ranks[i])
            return
        # Prefill has few long segments (SGMV); decode has one token per sequence (BGMV).
        prefill = get_context().is_prefill
        for i in self.live_slices:
            a_stack, b_stack, offset = a_stacks[i], b_stacks[i], offsets[i]
            if prefill:
                lora_shrink_expand_sgmv(y2, x2, a_stack, b_stack, lora.seg_bounds, offset)
            else:
                lora_bgmv(y2, x2, a_stack, b_stack, lora.token_slots, offset)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_pair(self, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        if a.dim() != 2 or a.shape[1] != self.in_features:
            raise ValueError(f"slice {i}: A must be [r, {self.in_features}], got {list(a.shape)}")
        if b.dim() != 2 or tuple(b.shape) != (self.output_sizes[i], rank):
            raise ValueError(f"slice {i}: B must be [{self.output_sizes[i]}, {rank}], got {list(b.shape)}")
        if rank > self.max_rank:
            raise ValueError(f"slice {i}: rank {rank} exceeds max_rank {self.max_rank}")

    def extra_repr(self) -> str:
        return f"output_sizes={self.output_sizes}, num_slots={self.num_slots}, max_rank={self.max_rank}"


# Token counts up to which one launch does all live slices (`triton_lora_decode`). Its programs
# each recompute their token's h from the whole A, so the A bytes read (from L2) grow with
# T x column chunks, while the shrink-once path pays a fixed ~2.7 us per launch and up to
# 2 + slices launches per layer. At 8 tokens the grid already holds about one program per SM.
# Measured on an H100 (rank 16, one adapter, CUDA graph; load_tests/results/KERNELS.md) the
# one launch still wins at 16 and 32 tokens; rank 64 reads 4x the A bytes per program and is
# not measured, so the threshold stays at 8.
# The test is on T alone, not on prefill vs decode: the kernel is exact for any T, and a
# prefill of a few tokens is the same work as a decode step of as many sequences. CUDA-graph
# decode pads T to a captured size, so batches 1, 2, 4 and 8 take this path.
SMALL_BATCH_TOKENS = 8
# Largest max_rank for that path: its A re-reads grow with the rank (64: 512 KiB per slice
# and token on llama-8b).
_SMALL_MAX_RANK = 64

# Widest fused shrink (slices x max_rank): the kernel holds a [rank, 128] tile of A per stage
# in shared memory, and three stages of 256 rows would not fit.
_MAX_FUSED_RANK = 128


@functools.cache
def _triton_lora() -> ModuleType:
    # Imported on first CUDA use: Triton is not installed where only the CPU path runs.
    from engine.kernels import triton_lora

    return triton_lora


@functools.cache
def _triton_lora_decode() -> ModuleType:
    from engine.kernels import triton_lora_decode

    return triton_lora_decode
