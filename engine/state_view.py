"""The engine's state as plain data, for `/metrics` (what `stats()` does not carry).

Read on the engine thread between two steps (`AsyncEngine.engine_state`): the scheduler's
queues by adapter, every adapter's state and tier, the load-time histograms, the LoRA slot
count and the device's memory. Only plain values leave: no engine object crosses to the
server, so the same answer can later travel as a message from an engine-core process.
"""

from __future__ import annotations

from typing import Any

import torch

from scheduler.sequence import BASE_ADAPTER_ID


def engine_state(core: Any) -> dict[str, Any]:
    """`core` is the `LLMEngine`; runs on its thread."""
    names = {entry.adapter_id: entry.name for entry in core.identity.entries()}

    def adapter_names(ids: Any) -> set[str]:
        return {names[i] for i in ids if i != BASE_ADAPTER_ID and i in names}

    waiting = adapter_names(s.adapter_id for s in core.scheduler.waiting)
    # A request whose adapter is still loading into host memory waits too, before the scheduler sees it.
    waiting |= adapter_names(core.adapters.loading_for_requests())
    return {
        "adapters": [(info["id"], info["state"], info["tier"]) for info in core.adapter_infos()],
        "running_adapters": sorted(adapter_names(s.adapter_id for s in core.scheduler.running)),
        "waiting_adapters": sorted(waiting),
        "preempted_waiting": sum(1 for s in core.scheduler.waiting if s.num_preemptions > 0),
        "preemptions": int(core.num_preemptions),
        "max_lora": int(core.lora.num_slots),
        "load_times": core.adapters.load_times.snapshot(),
        "gpu_memory": gpu_memory(core.device),
    }


def gpu_memory(device: torch.device) -> dict[str, dict[str, int]]:
    """device -> used/total (the whole card) and allocated/reserved (this process), bytes; {} off CUDA."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return {f"cuda:{index}": {"used": total - free, "total": total, "allocated": torch.cuda.memory_allocated(index),
                              "reserved": torch.cuda.memory_reserved(index)}}
