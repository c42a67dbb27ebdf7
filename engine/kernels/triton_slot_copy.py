"""One launch that writes a whole adapter into a GPU slot, from one staged copy of its weights.

A promote used to be hundreds of small torch calls (a zero, a strided copy and a rank write per
module and slice): host work, not bandwidth, so a 26 MiB llama-8b adapter took ~6 ms. Here the
adapter's page-locked buffer (`adapters.loader.pin_all`) reaches the device in one DMA and one
kernel places every region:

    grid = (regions, cdiv(largest region, BLOCK))
    program (r, b): src_off, dst0, slot_stride, rows_src, cols_src, cols_dst, numel = desc[r]
                    e   = b * BLOCK + arange(BLOCK)            element of the region, row-major
                    row = e // cols_dst, col = e % cols_dst
                    dst0[slot * slot_stride + e] = staged[src_off + row * cols_src + col]
                                                   if row < rows_src and col < cols_src else 0

A region is one slot's A or B of one slice of one fused module (`LoRALinear`): A rows
`i * max_rank ...` of `lora_a[slot]`, or the whole of `lora_b_i[slot]`. Both are contiguous in
the slot, so the destination is a flat run of `numel` elements starting at
`dst0 + slot * slot_stride`; the source is the adapter's A [r, in] or B [out, r] (row-major),
and what lies past its rank is zero padding. A slice the adapter does not target is a region
with `rows_src = 0`: all zeros. `dst0` is the device address of the slot-0 region, so the
descriptor table depends only on the adapter and the slot layout, and is built once per
adapter when it is loaded into host memory (`engine.lora.slot_plan`, which also holds a torch reference of this kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.lora.slot_plan import DESC_COLUMNS

BLOCK = 8192


@triton.jit(do_not_specialize=["slot"])
def _slot_copy(staged_ptr, desc_ptr, slot, BLOCK: tl.constexpr, COLUMNS: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    row_desc = desc_ptr + r * COLUMNS
    numel = tl.load(row_desc + 6)
    start = b.to(tl.int64) * BLOCK
    if start < numel:
        src_off = tl.load(row_desc + 0)
        dst = tl.load(row_desc + 1).to(tl.pointer_type(staged_ptr.dtype.element_ty))
        slot_stride = tl.load(row_desc + 2)
        rows_src = tl.load(row_desc + 3)
        cols_src = tl.load(row_desc + 4)
        cols_dst = tl.load(row_desc + 5)
        e = start + tl.arange(0, BLOCK).to(tl.int64)
        in_region = e < numel
        row = e // cols_dst
        col = e - row * cols_dst
        inside = in_region & (row < rows_src) & (col < cols_src)
        value = tl.load(staged_ptr + src_off + row * cols_src + col, mask=inside, other=0.0)
        tl.store(dst + slot.to(tl.int64) * slot_stride + e, value, mask=in_region)


def slot_copy(staged: torch.Tensor, desc: torch.Tensor, slot: int, max_numel: int) -> None:
    """Write every region of `desc` ([regions, DESC_COLUMNS] int64, on the device) into `slot`,
    reading the adapter from `staged` (its flat weights on the device)."""
    if desc.shape[0] == 0:
        return
    grid = (desc.shape[0], triton.cdiv(max_numel, BLOCK))
    _slot_copy[grid](staged, desc, slot, BLOCK=BLOCK, COLUMNS=DESC_COLUMNS, num_warps=8)
