"""The async bridge: deltas, aborts that free blocks, errors before the first delta."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import RequestTooLongError, UnknownAdapterError
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine_parts(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    adapter = tiny_adapter_factory(model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=3)
    return model_dir, {"ada": adapter}


def _make(engine_parts, **overrides) -> AsyncEngine:
    model_dir, adapters = engine_parts
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=96,
                          block_size=4, max_loras=2, max_lora_rank=8, **overrides)
    return AsyncEngine(config, adapters, served_model_name="tiny")


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams, adapter=None):
    tokens, text, finish = [], "", None
    async for delta in engine.generate(rid, prompt, params, adapter):
        tokens.extend(delta.token_ids)
        text += delta.text
        finish = delta.finish_reason
    return tokens, text, finish


def test_generate_streams_until_length_and_frees_everything(engine_parts):
    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            tokens, _, finish = await _collect(engine, "a", [5, 6, 7, 8], params)
            assert len(tokens) == 6 and finish == "length"
            base, lora = await asyncio.gather(
                _collect(engine, "b", [5, 6, 7, 8], params),
                _collect(engine, "c", [5, 6, 7, 8], params, adapter="ada"),
            )
            assert base[0] == tokens, "the same greedy request must give the same tokens concurrently"
            assert lora[0] != tokens, "the adapter must change the output"
            await asyncio.sleep(0.05)
            stats = engine.stats()
            assert stats["num_free_blocks"] == stats["num_total_blocks"]
            assert engine.adapter_refcounts() == {"ada": 0}
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_closing_the_stream_aborts_and_frees_blocks(engine_parts):
    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
            for i in range(20):
                stream = engine.generate(f"x{i}", [5, 6, 7, 8, 9], params, adapter="ada")
                await stream.__anext__()
                await stream.aclose()
            for _ in range(100):
                stats = engine.stats()
                if stats["num_requests"] == 0:
                    break
                await asyncio.sleep(0.02)
            stats = engine.stats()
            assert stats["num_requests"] == 0
            assert stats["num_free_blocks"] == stats["num_total_blocks"]
            assert engine.adapter_refcounts() == {"ada": 0}
            # and the engine still answers
            _, _, finish = await _collect(engine, "after", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
            assert finish == "length"
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_errors_surface_before_the_first_delta(engine_parts):
    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            with pytest.raises(UnknownAdapterError, match="nope"):
                await _collect(engine, "u", [5, 6], SamplingParams(max_tokens=2), adapter="nope")
            with pytest.raises(RequestTooLongError, match="maximum context length"):
                await _collect(engine, "l", [5] * 90, SamplingParams(max_tokens=10))
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await _collect(engine, "v", [10**7], SamplingParams(max_tokens=2))
            assert engine.stats()["num_streams"] == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine_parts):
    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
            alone, _, _ = await _collect(engine, "s1", [5, 6, 7], seeded)
            again, _, _ = await _collect(engine, "s2", [5, 6, 7], seeded)
            other_seed, _, _ = await _collect(
                engine, "s3", [5, 6, 7], SamplingParams(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True)
            )
            noise = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
            results = await asyncio.gather(
                _collect(engine, "n1", [9, 10, 11, 12], noise),
                _collect(engine, "s4", [5, 6, 7], seeded),
                _collect(engine, "n2", [13, 14], noise, adapter="ada"),
            )
            assert alone == again == results[1][0]
            assert other_seed != alone
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_an_adapter_trained_on_the_served_name_matches_the_base(engine_parts, tmp_path):
    import json
    import shutil

    from adapters.config import AdapterConfig

    model_dir, adapters = engine_parts
    renamed = tmp_path / "renamed"
    shutil.copytree(adapters["ada"], renamed)
    config_path = renamed / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "tiny"
    config_path.write_text(json.dumps(config))

    async def main():
        engine = AsyncEngine(
            EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=96, block_size=4,
                         max_loras=2, max_lora_rank=8),
            {"renamed": renamed},
            served_model_name="tiny",
            adapter_config=AdapterConfig(refuse_base_mismatch=True),
        )
        await engine.start()
        try:
            _, _, finish = await _collect(engine, "t", [5, 6], SamplingParams(max_tokens=2, ignore_eos=True),
                                          adapter="renamed")
            assert finish == "length"
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_first_delta_carries_queue_time_and_loads_are_timed(engine_parts):
    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            deltas = [d async for d in engine.generate(
                "q", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), "ada")]
            assert deltas[0].queue_time is not None and deltas[0].queue_time >= 0.0
            assert all(d.queue_time is None for d in deltas[1:])
            await asyncio.sleep(0.05)
            stats = engine.stats()
            assert stats["adapter_loads"] == 1
            assert stats["adapter_load_seconds"] > 0.0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_lost_tensor_parallel_worker_stops_the_engine_and_is_reported(engine_parts):
    from engine.tp_driver import WorkerDiedError

    async def main():
        engine = _make(engine_parts)
        await engine.start()
        try:
            assert engine.failure is None

            def lost_rank():
                raise WorkerDiedError("tensor-parallel worker 1 exited")

            engine._core.step = lost_rank  # what the driver raises when a rank's process is gone
            deltas = [d async for d in engine.generate("w", [5, 6], SamplingParams(max_tokens=4))]
            assert deltas[-1].finish_reason == "error" and "worker 1" in deltas[-1].error
            for _ in range(100):
                if engine.failure:
                    break
                await asyncio.sleep(0.01)
            assert "WorkerDiedError" in engine.failure
            assert not engine.is_running
        finally:
            await engine.shutdown()

    asyncio.run(main())
