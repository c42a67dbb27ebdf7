"""Programmatic dependent launch (PDL) for the decode chain, on Hopper and newer.

A batch-1 decode step is ~430 kernels that each read their share of the weights and then
stop. Launched plainly, kernel n+1 starts only after kernel n has drained: every boundary
costs the ramp-up and tail of a memory stream (~2-8 µs at 3 TB/s). With PDL a kernel lets
its successor launch early (`gdc_launch_dependents`), and the successor does the part of
its work that depends on no earlier kernel (reading its weights) before it waits for its
input (`gdc_wait`), so the memory system never idles between kernels.

Rules every PDL kernel here keeps:
- it reads anything an earlier kernel wrote, and writes anything at all, only after
  `gdc_wait()`: the wait returns once the preceding grid has completed and its writes are
  visible, which, since that grid waited in turn, covers every earlier kernel;
- before the wait it only reads memory no kernel of the step writes (weights).
A PDL launch after a kernel that never triggers simply starts at its end, and
`gdc_wait` in a kernel launched without PDL returns at once, so mixing PDL kernels with
cuBLAS and torch kernels is safe. CUDA graph capture keeps the programmatic edges.

`launch_args(x)` is what a launcher passes (kernels take a `USE_PDL` constexpr);
`set_enabled(False)` turns PDL off (the benchmarks compare both).
"""

from __future__ import annotations

import torch

_enabled: bool = True
_capability: dict[int, bool] = {}


def set_enabled(on: bool) -> None:
    """Turn programmatic dependent launch on or off for the launchers of engine/kernels."""
    global _enabled
    _enabled = bool(on)


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` should use PDL (on, and a Hopper-or-newer GPU)."""
    if not _enabled or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capability[index]


def launch_args(x: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for a Triton launch on x's device: the kernel's `USE_PDL` constexpr and
    Triton's `launch_pdl` option, both on where `enabled`."""
    on = enabled(x.device)
    return {"USE_PDL": on, "launch_pdl": on}
