"""The adapter lifecycle under load: 40 adapters of mixed ranks through 4 GPU slots and 8 host
slots, loaded on demand off the engine thread, with two of them pinned; outputs checked
token for token against transformers running each adapter merged into the base, alone."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

import engine.adapter_manager as adapter_manager
from adapters.config import AdapterConfig
from adapters.registry import AdapterState
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.sampling_params import SamplingParams
from tests.adapters.lora_dirs import ALL_TARGETS, merged_greedy, model_dims, one_torch_thread, write_lora_dir

NUM_ADAPTERS = 40
GPU_SLOTS = 4
HOST_SLOTS = 8
MAX_NEW = 5
RANKS = (2, 4, 8, 16)
TARGETS = (("q_proj", "v_proj"), ALL_TARGETS, ("k_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
PINNED = ("ada-00", "ada-21")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("adapter-root")
    dims = model_dims(model_dir)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        name = f"ada-{i:02d}"
        adapters[name] = write_lora_dir(root / name, dims, rank=RANKS[i % 4], alpha=2.0 * RANKS[(i // 4) % 4],
                                        targets=TARGETS[(i // 2) % 4], seed=1000 + i, scale=1.5)
    rng = random.Random(5)
    jobs: list[tuple[list[int], str | None]] = []
    for name in [*adapters, *adapters, None, None]:
        jobs.append(([rng.randrange(3, 300) for _ in range(rng.randint(3, 9))], name))
    rng.shuffle(jobs)
    refs = merged_greedy(model_dir, adapters, jobs, MAX_NEW)
    return model_dir, root, jobs, refs


def _engine(model_dir: Path, root: Path) -> AsyncEngine:
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                          max_num_seqs=16, max_loras=GPU_SLOTS, max_lora_rank=16)
    return AsyncEngine(config, served_model_name="tiny",
                       adapter_config=AdapterConfig(max_cpu_adapters=HOST_SLOTS, adapter_root=root))


async def _tokens(engine: AsyncEngine, rid: str, prompt: list[int], adapter: str | None) -> list[int]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    async for delta in engine.generate(rid, prompt, params, adapter):
        assert delta.finish_reason != "error", delta.error
        tokens.extend(delta.token_ids)
    return tokens


def _watch_invariants(engine: AsyncEngine) -> list[str]:
    """Check the tier invariants after every engine step (on the engine thread)."""
    core = engine._core
    manager = core.adapters
    violations: list[str] = []
    step = core.step

    def checked_step():
        deltas = step()
        host = manager.host.members()
        if len(host) > HOST_SLOTS:
            violations.append(f"{len(host)} adapters in host memory")
        if len(manager.slots.resident) > GPU_SLOTS:
            violations.append(f"{len(manager.slots.resident)} adapters in GPU slots")
        for adapter_id in manager.slots.pinned:
            record = manager.host.get(adapter_id)
            if (manager.slots.slot_of(adapter_id) is None or record is None or record.weights is None
                    or record.gpu_evictions or record.host_evictions):
                violations.append(f"pinned adapter {adapter_id} left the GPU or host memory")
        for seq in core.scheduler.running:
            if seq.adapter_id and manager.slots.slot_of(seq.adapter_id) is None:
                violations.append(f"running adapter {seq.adapter_id} has no slot")
        return deltas

    core.step = checked_step  # type: ignore[method-assign]
    return violations


def test_forty_adapters_through_four_slots_match_their_references(setup):
    model_dir, root, jobs, refs = setup

    async def main():
        engine = _engine(model_dir, root)
        violations = _watch_invariants(engine)
        await engine.start()
        try:
            assert len(engine.adapter_names()) == NUM_ADAPTERS, "every directory under the root is served"
            for name in PINNED:
                info = await engine.promote_adapter(name)
                assert info["state"] == "pinned"
            outputs = await asyncio.gather(*(
                _tokens(engine, f"r{i}", prompt, adapter) for i, (prompt, adapter) in enumerate(jobs)
            ))
            for i, (tokens, ref) in enumerate(zip(outputs, refs, strict=True)):
                assert tokens == ref, f"request {i} ({jobs[i][1]}) differs from its reference"
            # A second, smaller wave: adapters evicted from host memory come back from disk.
            again = [(i, job) for i, job in enumerate(jobs) if job[1] is not None][:12]
            second = await asyncio.gather(*(_tokens(engine, f"s{i}", p, a) for i, (p, a) in again))
            assert second == [refs[i] for i, _ in again]
            await asyncio.sleep(0.05)
            infos = {info["id"]: info for info in await engine.list_adapters()}
            counters = engine.adapter_counters()
        finally:
            await engine.shutdown()
        assert violations == []
        assert counters["adapter_loads"] > NUM_ADAPTERS, "host evictions must force reloads"
        assert counters["adapter_host_evictions"] >= NUM_ADAPTERS - HOST_SLOTS
        assert counters["adapter_gpu_evictions"] > 0 and counters["adapter_gpu_loads"] > NUM_ADAPTERS
        assert counters["adapter_refcount_total"] == 0
        assert all(info["in_flight"] == 0 for info in infos.values())
        for name in PINNED:
            assert infos[name]["state"] == "pinned" and infos[name]["gpu_evictions"] == 0
            assert infos[name]["gpu_loads"] == 1 and infos[name]["host_evictions"] == 0
        assert sum(info["requests"] for info in infos.values()) == sum(a is not None for _, a in jobs) + len(again)
        assert {info["rank"] for info in infos.values()} == set(RANKS)

    asyncio.run(main())


def test_a_slow_load_does_not_hold_up_other_adapters(setup, monkeypatch):
    model_dir, root, jobs, refs = setup
    slow_name = "ada-07"
    release = threading.Event()
    real_load = adapter_manager.load_from_source

    def load(name, *args, **kwargs):
        if name == slow_name:
            assert release.wait(30), "the slow load was never released"
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(adapter_manager, "load_from_source", load)
    slow_job = next(i for i, (_, a) in enumerate(jobs) if a == slow_name)
    others = [i for i, (_, a) in enumerate(jobs) if a not in (slow_name, None)][:6]

    async def main():
        engine = _engine(model_dir, root)
        await engine.start()
        try:
            slow = asyncio.create_task(_tokens(engine, "slow", jobs[slow_job][0], slow_name))
            await asyncio.sleep(0.05)
            done = await asyncio.wait_for(
                asyncio.gather(*(_tokens(engine, f"o{i}", jobs[i][0], jobs[i][1]) for i in others)), 30
            )
            assert done == [refs[i] for i in others]
            assert not slow.done()
            assert (await engine.adapter_info(slow_name))["state"] == AdapterState.LOADING.value
            release.set()
            assert await asyncio.wait_for(slow, 30) == refs[slow_job]
            assert engine.adapter_refcounts()[slow_name] == 0
        finally:
            release.set()
            await engine.shutdown()

    asyncio.run(main())


def test_shutdown_answers_requests_waiting_for_a_load(setup, monkeypatch):
    model_dir, root, jobs, _ = setup
    release = threading.Event()
    real_load = adapter_manager.load_from_source

    def load(name, *args, **kwargs):
        release.wait(30)
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(adapter_manager, "load_from_source", load)

    async def main():
        engine = _engine(model_dir, root)
        await engine.start()
        try:
            waiting = asyncio.create_task(_tokens(engine, "w", jobs[0][0], "ada-03"))
            await asyncio.sleep(0.05)
            await engine.shutdown()
            with pytest.raises(EngineDeadError, match="shut down"):
                await asyncio.wait_for(waiting, 10)
        finally:
            release.set()

    asyncio.run(main())


def test_callers_cancelled_at_any_point_leak_nothing(setup):
    model_dir, root, jobs, refs = setup

    async def main():
        engine = _engine(model_dir, root)
        await engine.start()
        try:
            for round_ in range(4):
                tasks = [asyncio.create_task(_tokens(engine, f"c{round_}-{i}", prompt, adapter))
                         for i, (prompt, adapter) in enumerate(jobs[:30])]
                # Cancel while acquiring, while waiting for a host load, while queued or running.
                await asyncio.sleep(0.002 * round_)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert await asyncio.wait_for(_tokens(engine, "after", jobs[1][0], jobs[1][1]), 30) == refs[1]
            for _ in range(200):
                if engine.stats()["num_requests"] == 0 and engine.stats()["adapter_refcount_total"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats()["num_requests"] == 0
            assert all(count == 0 for count in engine.adapter_refcounts().values())
        finally:
            await engine.shutdown()

    asyncio.run(main())
