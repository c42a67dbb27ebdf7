"""The tensor-parallel group: which shard this process holds, and the collectives the model needs.

One process per device. `init_tensor_parallel` joins two groups over the same ranks:

- the device group (NCCL on CUDA, gloo on the CPU) carries the model's all-reduces and
  all-gathers, inside CUDA graphs too;
- the control group (always gloo, on the CPU) carries what rank 0 tells the workers before
  each call (a pickled step description): Python objects that NCCL could only move through a
  device copy. Its timeout is long because an idle server sends nothing for hours and a
  worker waits in a broadcast all that time.

Until `init_tensor_parallel` runs (and always at world size 1) this process is rank 0 of 1
and every collective returns its input: single-device code pays one Python branch.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) can take every GPU of a shared host out of service when a job that
# uses it dies badly; Quiver's all-reduces are small and do not need it.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_CONTROL_TIMEOUT = timedelta(days=365)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: Any = None  # ProcessGroup | None
    control_group: Any = None


_GROUP = TPGroup(rank=0, size=1)


def disable_nvlink_multicast() -> None:
    """Set the variables that keep NCCL (and PyTorch's symmetric memory) off NVLink multicast."""
    os.environ.update(NCCL_ENV)


def init_tensor_parallel(
    rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float = 600.0
) -> TPGroup:
    """Join the group as `rank` of `world_size`; blocks until every rank has joined."""
    global _GROUP
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if _GROUP.size > 1:
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    if world_size == 1:
        return _GROUP
    disable_nvlink_multicast()
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            raise ValueError("a tensor-parallel rank needs an explicit CUDA device index")
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        # Binding the device makes NCCL set up its communicator now, before any CUDA graph
        # capture (a communicator cannot be created inside one).
        device_id=device if cuda else None,
    )
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    _GROUP = TPGroup(rank=rank, size=world_size, device_group=dist.group.WORLD, control_group=control)
    if cuda:
        all_reduce(torch.zeros(1, device=device))  # first use of the communicator, outside any graph
    return _GROUP


def destroy_tensor_parallel(collective: bool = True, timeout_s: float | None = None) -> None:
    """Leave the group (a no-op when this process never joined one).

    NCCL's teardown is collective (a finalize that flushes every rank's work): each rank must
    call this at about the same time, or it waits for the others forever. `collective=False`
    says a rank is gone: an NCCL group is then abandoned (the process is about to exit) rather
    than torn down. `timeout_s` bounds the wait; past it the teardown is left running.
    """
    global _GROUP
    if _GROUP.size > 1 and dist.is_initialized():
        if collective or dist.get_backend() == "gloo":
            if timeout_s is None:
                dist.destroy_process_group()
            else:
                worker = threading.Thread(target=dist.destroy_process_group, name="quiver-tp-teardown", daemon=True)
                worker.start()
                worker.join(timeout_s)
                if worker.is_alive():
                    log.warning("the tensor-parallel group did not tear down within %.0f s", timeout_s)
        else:
            log.warning("a tensor-parallel rank is gone: leaving the NCCL group without tearing it down")
    _GROUP = TPGroup(rank=0, size=1)


def barrier() -> None:
    """Wait until every rank gets here (over the control group)."""
    if _GROUP.size > 1:
        dist.barrier(group=_GROUP.control_group)


def tp_rank() -> int:
    return _GROUP.rank


def tp_size() -> int:
    return _GROUP.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if _GROUP.size == 1:
        return x
    dist.all_reduce(x, group=_GROUP.device_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` [..., n] along the last dimension, rank order: [..., size * n]."""
    size = _GROUP.size
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=_GROUP.device_group)
    # [size * rows, ..., n] -> [rows, ..., size * n]
    return out.view(size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (the KV-block count all ranks can hold)."""
    if _GROUP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.control_group)
    return int(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0 sends `obj` (picklable) to every rank; each rank returns it (others pass None)."""
    if _GROUP.size == 1:
        return obj
    box = [obj if _GROUP.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_GROUP.control_group, device=torch.device("cpu"))
    return box[0]
