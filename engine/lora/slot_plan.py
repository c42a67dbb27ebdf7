"""An adapter's copy plan: where each of its tensors lands in a GPU slot, built once per adapter.

`LoraSlots.load` used to walk every module and slice on each promote (views, checks, zeroes,
strided copies: ~6 ms of host work for a llama-8b adapter). The walk depends only on the
adapter and the slot layout, not on the slot, so it is done once, on the loader thread, when
the adapter enters host memory (`LoraSlots.prepare`). A promote is then one DMA per staged
chunk, one kernel launch per chunk (`engine.kernels.triton_slot_copy`, semantics there), one
rank-column copy and the live-slice bookkeeping.

A region is one slice's A or B in one fused module. Its destination is `numel` contiguous
elements at `offset + slot * slot_stride` of a flat slot buffer; its source, rows_src x
cols_src row-major at `src_offset` of the staged chunk, or nothing (a slice the adapter does
not target: zeros).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DESC_COLUMNS = 7  # src_offset, dst_address, slot_stride, rows_src, cols_src, cols_dst, numel

# Largest piece of an adapter staged on the device at once: a bigger adapter (all-linear at a
# high rank) is copied in several chunks, so a promote never needs a large free block (the
# per-module load, engine/lora/layers.py, stages nothing bigger either).
STAGE_MAX_BYTES = 128 << 20


@dataclass(frozen=True)
class Region:
    buffer: torch.Tensor  # the flat slot buffer (all slots)
    offset: int  # element offset of the slot-0 region in `buffer`
    slot_stride: int  # elements between two slots' regions
    numel: int
    cols_dst: int
    source: torch.Tensor | None  # [rows_src, cols_src], a view of the adapter's flat host buffer


@dataclass(frozen=True)
class Chunk:
    """Source elements [lo, hi) of the adapter's flat buffer and the regions they fill."""

    lo: int
    hi: int
    desc: torch.Tensor  # [regions, DESC_COLUMNS] int64 (page-locked when the slots are on a GPU)
    max_numel: int
    regions: tuple[Region, ...]


@dataclass(frozen=True)
class SlotPlan:
    owner: Any  # the LoraSlots it was built for
    source: torch.Tensor  # the adapter's flat host buffer
    chunks: tuple[Chunk, ...]
    rank_column: torch.Tensor  # [rank table rows] int32: this adapter's rank per slice
    marks: tuple[tuple[Any, int, bool], ...] = field(repr=False)  # (LoRALinear, slice, targeted)


def flat_source(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one contiguous 1-D buffer every tensor is a contiguous view of, or None."""
    if not tensors:
        return None
    base = tensors[0]._base
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    if any(t._base is not base or not t.is_contiguous() or t.dtype != base.dtype for t in tensors):
        return None
    return base


def build_chunks(regions: list[Region], source: torch.Tensor, pin: bool) -> tuple[Chunk, ...]:
    """Group regions into chunks whose source span fits STAGE_MAX_BYTES (zero regions join the first)."""
    origin = source.storage_offset()
    limit = max(1, STAGE_MAX_BYTES // source.element_size())
    groups: list[tuple[list[int], list[Region]]] = []  # ([lo, hi], regions)
    for region in sorted((r for r in regions if r.source is not None), key=lambda r: r.source.storage_offset()):
        lo = region.source.storage_offset() - origin
        hi = lo + region.source.numel()
        if groups and hi - groups[-1][0][0] <= limit:
            groups[-1][0][1] = max(groups[-1][0][1], hi)
            groups[-1][1].append(region)
        else:
            groups.append(([lo, hi], [region]))
    if not groups:
        groups.append(([0, 0], []))
    groups[0][1].extend(r for r in regions if r.source is None)
    return tuple(_chunk(group, lo, hi, origin, pin) for (lo, hi), group in groups if group)


def _chunk(group: list[Region], lo: int, hi: int, origin: int, pin: bool) -> Chunk:
    rows = []
    for r in group:
        address = r.buffer.data_ptr() + r.offset * r.buffer.element_size()
        if r.source is None:
            rows.append([0, address, r.slot_stride, 0, 1, r.cols_dst, r.numel])
        else:
            rows_src, cols_src = r.source.shape
            offset = r.source.storage_offset() - origin - lo
            rows.append([offset, address, r.slot_stride, rows_src, cols_src, r.cols_dst, r.numel])
    desc = torch.tensor(rows, dtype=torch.int64)
    return Chunk(lo, hi, desc.pin_memory() if pin else desc, max(r.numel for r in group), tuple(group))


def apply_reference(plan: SlotPlan, slot: int) -> None:
    """The kernel's semantics in torch (tests, and a device without Triton)."""
    flat = plan.source
    for chunk in plan.chunks:
        staged = flat[chunk.lo : chunk.hi]
        for r, row in zip(chunk.regions, chunk.desc.tolist(), strict=True):
            src_off, _, stride, rows_src, cols_src, cols_dst, numel = row
            region = torch.zeros(numel // cols_dst, cols_dst, dtype=r.buffer.dtype, device=r.buffer.device)
            if rows_src:
                src = staged[src_off : src_off + rows_src * cols_src].view(rows_src, cols_src)
                region[:rows_src, :cols_src] = src.to(region.device)
            start = r.offset + slot * stride
            r.buffer[start : start + numel] = region.flatten()
