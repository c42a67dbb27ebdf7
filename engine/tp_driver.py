"""Rank 0 of a tensor-parallel engine: starts the workers and repeats its model calls to them.

`TensorParallelDriver.launch(config)` spawns ranks 1..N-1 (torch.multiprocessing with the
spawn start method, so CUDA state is never forked), joins the group as rank 0 and returns
once every rank has joined. The engine then builds its LoRA slots and model runner through
`lora_slots()` / `model_runner()`: the same objects as on one device, except that each call
that touches the model is first broadcast to the workers (engine/tp_worker.py). Scheduling,
adapters and sampling stay here; the workers only run forwards.

A worker that dies is noticed at the next call (its exit code is in the error). A worker that
dies inside a collective leaves rank 0 waiting there until the group's timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from engine import distributed
from engine.config import EngineConfig
from engine.lora.slots import LoraSlots
from engine.model_runner import ModelRunner, StepOutput
from engine.tp_worker import SHUTDOWN, rank_device, worker_main

log = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited while the engine still needed it."""


class TensorParallelDriver:
    """Owns the worker processes; `send` hands every worker the next model call."""

    def __init__(self, processes: list[Any], rendezvous_dir: str) -> None:
        self._processes = processes
        self._rendezvous_dir = rendezvous_dir
        self._joined = False
        self._closed = False

    @classmethod
    def launch(cls, config: EngineConfig) -> TensorParallelDriver:
        world = config.tensor_parallel_size
        device = rank_device(config, 0)
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(
                f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} are visible"
            )
        distributed.disable_nvlink_multicast()  # before spawning: the workers inherit the environment
        # A file rendezvous: no port to pick or collide on.
        rendezvous_dir = tempfile.mkdtemp(prefix="quiver-tp-")
        init_method = "file://" + os.path.join(rendezvous_dir, "rendezvous")
        ctx = mp.get_context("spawn")
        processes = [
            ctx.Process(target=worker_main, args=(rank, config, init_method), name=f"quiver-tp-{rank}", daemon=True)
            for rank in range(1, world)
        ]
        driver = cls(processes, rendezvous_dir)
        try:
            for process in processes:
                process.start()
            distributed.init_tensor_parallel(0, world, init_method, device)
            driver._joined = True
        except BaseException:
            driver.close()
            raise
        log.info("tensor parallelism: %d ranks on %s", world, device.type)
        return driver

    @property
    def world_size(self) -> int:
        return len(self._processes) + 1

    def send(self, method: str, *args: Any) -> None:
        """Broadcast the next model call; every worker makes it, then rank 0 does."""
        if self._closed:
            raise WorkerDiedError("the tensor-parallel workers were shut down")
        for process in self._processes:
            if not process.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker {process.name} exited with code {process.exitcode}")
        distributed.broadcast_object((method, args))

    def lora_slots(self, model: nn.Module, num_slots: int, max_rank: int) -> LoraSlots:
        self.send("init_lora", num_slots, max_rank)
        return MirroredLoraSlots(self, model, num_slots, max_rank)

    def model_runner(
        self, model: nn.Module, block_size: int, device: torch.device | str, kernels: str
    ) -> TensorParallelRunner:
        self.send("init_runner", block_size, kernels)
        return TensorParallelRunner(self, ModelRunner(model, block_size, device, kernels=kernels))

    def close(self, timeout_s: float = 30.0) -> None:
        """Tell the workers to stop, leave the group with them, wait for them (terminate stragglers).

        The teardown is collective under NCCL: rank 0 must take part while the workers do, not
        after waiting for them to exit (they would wait for it, and it for them).
        """
        if self._closed:
            return
        healthy = self._joined and all(p.is_alive() for p in self._processes)
        if healthy:
            try:
                self.send(SHUTDOWN)
                distributed.barrier()  # every worker has the message before the group goes
            except Exception:  # noqa: BLE001 - shutting down anyway; the processes are ended below
                log.exception("could not tell the tensor-parallel workers to stop")
                healthy = False
        self._closed = True
        if not healthy:  # a worker is gone or was never reached: end the rest before leaving alone
            self._end_processes(0.0)
        if self._joined:
            distributed.destroy_tensor_parallel(collective=healthy, timeout_s=timeout_s)
        self._end_processes(timeout_s)
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)

    def _end_processes(self, timeout_s: float) -> None:
        for process in self._processes:
            if process.pid is None:
                continue
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
                process.join(5)


@dataclasses.dataclass
class _HostWeights:
    """What a worker's `LoraSlots.load` reads, on the CPU (a CUDA tensor would unpickle on rank 0's GPU)."""

    name: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    max_rank: int


class MirroredLoraSlots(LoraSlots):
    """Rank 0's LoRA slots: each copy into (or clear of) a slot is repeated on every worker.

    Rank 0 copies first: an adapter it refuses raises here and never reaches a worker.
    """

    def __init__(self, driver: TensorParallelDriver, model: nn.Module, num_slots: int, max_rank: int) -> None:
        super().__init__(model, num_slots=num_slots, max_rank=max_rank)
        self._driver = driver

    def load(self, slot: int, weights: Any) -> None:
        super().load(slot, weights)
        modules = {key: (a.cpu(), b.cpu()) for key, (a, b) in weights.modules.items()}
        self._driver.send("lora_load", slot, _HostWeights(weights.name, modules, weights.max_rank))

    def clear(self, slot: int) -> None:
        super().clear(slot)
        self._driver.send("lora_clear", slot)


class TensorParallelRunner:
    """Rank 0's model runner: the step's inputs are prepared once here, sent, and run on every rank."""

    def __init__(self, driver: TensorParallelDriver, local: ModelRunner) -> None:
        self._driver = driver
        self.local = local

    @property
    def model(self) -> nn.Module:
        return self.local.model

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def use_triton(self) -> bool:
        return self.local.use_triton

    @property
    def graphs(self) -> Any:
        return self.local.graphs

    def execute(
        self, seqs: list[Any], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int],
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return self.execute_step(seqs, num_new_tokens, is_prefill, lora_slots, pending_tokens).logits

    def execute_step(
        self, seqs: list[Any], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int],
        pending_tokens: torch.Tensor | None = None, prompt_logprobs: list[tuple[int, int]] | None = None,
    ) -> StepOutput:  # fmt: skip
        if pending_tokens is not None:  # the workers hold no copy of rank 0's sampled ids
            raise ValueError("tensor-parallel steps run one at a time: no placeholder tokens")
        # Every rank scores the same positions: the vocabulary gather is a collective.
        step = self.local.prepare(seqs, num_new_tokens, is_prefill, lora_slots, prompt_logprobs)
        self._driver.send("run", step)
        return self.local.run_step(step)

    def kv_cache_budget(self, *args: Any) -> int:
        """The smallest budget of any rank: every rank allocates the same number of blocks."""
        if self.device.type != "cuda":
            raise ValueError("kv_cache_budget measures a CUDA device")
        self._driver.send("kv_cache_budget", *args)
        return distributed.min_over_ranks(self.local.kv_cache_budget(*args))

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        self._driver.send("allocate_kv_cache", num_blocks, dtype)
        self.local.allocate_kv_cache(num_blocks, dtype)

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        # Checked before sending: a worker that raised would leave this rank alone in the capture.
        if not self.use_triton:
            raise ValueError("CUDA graphs need the CUDA kernels (device cuda, kernels='auto')")
        self._driver.send("capture_decode_graphs", max_batch, max_model_len)
        self.local.capture_decode_graphs(max_batch, max_model_len)
