"""Pure-torch reference LoRA kernels: the CPU path and the oracle the GPU kernels are tested against.

Both take stacked per-slot weights, zero-padded to a common max rank:
    a_stack [num_slots, max_rank, in]    (A of each slot; rows past the adapter's rank are zero)
    b_stack [num_slots, out, max_rank]   (B * scaling; columns past the rank are zero)
and add the LoRA delta in place into the column block y[:, out_offset:out_offset + out], so a
fused layer (qkv, gate_up) calls them once per output slice. Slot -1 means "base model": those
tokens are never touched. The zero padding contributes exact zeros, so results do not depend
on max_rank. Products are accumulated in float32 and cast back to y's dtype once.
"""

from __future__ import annotations

import torch


def lora_shrink_expand_sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    seg_bounds: list[tuple[int, int, int]],
    out_offset: int,
) -> None:
    """Segmented LoRA (prefill): one matmul pair per contiguous run of tokens sharing a slot.

    Semantics:
        out = b_stack.shape[1]
        for (start, end, slot) in seg_bounds:
            if slot >= 0 and end > start:
                y[start:end, out_offset:out_offset + out] += (x[start:end] @ a_stack[slot].T) @ b_stack[slot].T
    """
    out = b_stack.shape[1]
    for start, end, slot in seg_bounds:
        if slot < 0 or end <= start:
            continue
        xs = x[start:end].to(torch.float32)
        delta = (xs @ a_stack[slot].to(torch.float32).T) @ b_stack[slot].to(torch.float32).T
        y[start:end, out_offset : out_offset + out] += delta.to(y.dtype)


def lora_bgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    token_slots: torch.Tensor,
    out_offset: int,
) -> None:
    """Gathered LoRA (decode): each token picks its own slot's A and B.

    Semantics:
        out = b_stack.shape[1]
        for t in range(x.shape[0]):
            s = token_slots[t]
            if s >= 0:
                y[t, out_offset:out_offset + out] += (x[t] @ a_stack[s].T) @ b_stack[s].T
    """
    out = b_stack.shape[1]
    rows = torch.nonzero(token_slots >= 0).squeeze(1)
    if rows.numel() == 0:
        return
    slots = token_slots[rows]
    xs = x[rows].to(torch.float32).unsqueeze(-1)  # [n, in, 1]
    shrunk = torch.bmm(a_stack[slots].to(torch.float32), xs)  # [n, max_rank, 1]
    delta = torch.bmm(b_stack[slots].to(torch.float32), shrunk).squeeze(-1)  # [n, out]
    y[rows, out_offset : out_offset + out] += delta.to(y.dtype)
