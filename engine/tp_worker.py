"""A tensor-parallel worker (rank > 0): one shard of the model, repeating rank 0's model calls.

Rank 0 keeps everything else (HTTP, scheduler, adapter registry, sampling). Before each call
that touches the model — set-up, every step, every adapter copy into a GPU slot — it
broadcasts the call's name and arguments over the control group (engine/distributed.py);
the worker makes the same call on its shard, so the collectives inside the forward pair up
rank by rank. The calls are `ShardWorker`'s methods named in `COMMANDS`; engine/tp_driver.py
sends them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from multiprocessing.connection import wait
from typing import Any

import torch

from engine import distributed
from engine.config import EngineConfig
from engine.lora.slots import LoraSlots
from engine.model_runner import ModelRunner, StepInputs
from engine.models.loader import load_model

log = logging.getLogger(__name__)

SHUTDOWN = "shutdown"
COMMANDS = frozenset(
    {"init_lora", "init_runner", "kv_cache_budget", "allocate_kv_cache", "capture_decode_graphs", "run",
     "lora_load", "lora_clear"}
)  # fmt: skip


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank r runs on cuda:r (or the CPU)."""
    return torch.device("cuda", rank) if config.torch_device.type == "cuda" else torch.device("cpu")


class ShardWorker:
    """The model shard of one worker rank and the calls rank 0 repeats to it."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.device = device
        self.model = load_model(config.model, config.torch_dtype, device, config.load_format).model
        self.lora: LoraSlots | None = None
        self.runner: ModelRunner | None = None

    def serve(self) -> None:
        """Run rank 0's calls until it says `shutdown`."""
        while True:
            method, args = distributed.broadcast_object(None)
            if method == SHUTDOWN:
                return
            if method not in COMMANDS:
                raise RuntimeError(f"rank 0 sent an unknown call {method!r}")
            getattr(self, method)(*args)

    def init_lora(self, num_slots: int, max_rank: int) -> None:
        self.lora = LoraSlots(self.model, num_slots=num_slots, max_rank=max_rank)

    def init_runner(self, block_size: int, kernels: str) -> None:
        self.runner = ModelRunner(self.model, block_size, self.device, kernels=kernels)

    def kv_cache_budget(self, *args: Any) -> None:
        distributed.min_over_ranks(self._runner().kv_cache_budget(*args))

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        self._runner().allocate_kv_cache(num_blocks, dtype)

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        self._runner().capture_decode_graphs(max_batch, max_model_len)

    def run(self, step: StepInputs) -> None:
        self._runner().run(step)  # rank 0 samples; this rank's copy of the logits is dropped

    def lora_load(self, slot: int, weights: Any) -> None:
        self._lora().load(slot, weights)

    def lora_clear(self, slot: int) -> None:
        self._lora().clear(slot)

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError("rank 0 sent a model call before init_runner")
        return self.runner

    def _lora(self) -> LoraSlots:
        if self.lora is None:
            raise RuntimeError("rank 0 sent an adapter call before init_lora")
        return self.lora


def worker_main(rank: int, config: EngineConfig, init_method: str) -> None:
    """Entry point of a spawned worker process; its exit code says whether it failed."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(name)s: %(message)s"
    )
    _exit_with_parent()
    world = config.tensor_parallel_size
    device = rank_device(config, rank)
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    distributed.init_tensor_parallel(rank, world, init_method, device)
    try:
        ShardWorker(config, device).serve()
    except BaseException:
        log.exception("tensor-parallel worker %d failed", rank)
        # No teardown: rank 0 is not taking part, and NCCL's would wait for it forever.
        os._exit(1)
    # Rank 0 said shutdown: every rank tears the group down together (see destroy_tensor_parallel).
    distributed.barrier()
    distributed.destroy_tensor_parallel()


def _exit_with_parent() -> None:
    """End this process when rank 0's process is gone, however it went: an orphaned worker
    would hold its GPU while waiting forever for the next call."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="quiver-tp-parent-watch", daemon=True).start()
