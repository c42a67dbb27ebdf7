"""The same burst of prompts twice: the second is all prefix-cache hits and must not stall.

Through `AsyncEngine` (what `quiver serve` drives, no HTTP): 256 token-id prompts of uniform
length [100, 1024], 16 output tokens each, all sent at once; then the same 256 again. Reports
TTFT p50/p99 of each burst. Before the free-list fix (scheduler/block_manager.py) the repeat
produced no token for ~15 s on an H100; `prefix_burst_bench.py` times the scheduler alone.

    python load_tests/repeat_burst.py --out load_tests/results/repeat-burst [--shape llama-1b]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from load_tests.model_dir import write_model_dir  # noqa: E402


async def _ttft(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first = float("nan")
    async for delta in engine.generate(rid, prompt, params):
        if delta.token_ids and first != first:
            first = (time.perf_counter() - started) * 1e3
    return first


async def _burst(engine: AsyncEngine, tag: str, prompts: list[list[int]], max_tokens: int) -> dict:
    started = time.perf_counter()
    ttft = await asyncio.gather(*(_ttft(engine, f"{tag}-{i}", p, max_tokens) for i, p in enumerate(prompts)))
    return {"ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "ttft_ms_max": max(ttft), "wall_s": time.perf_counter() - started}


async def run(args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    model_dir = write_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape, args.layers)
    engine = AsyncEngine(EngineConfig(
        model=str(model_dir), load_format="dummy", device=args.device, dtype="bfloat16" if cuda else "float32",
        max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=16384, gpu_memory_utilization=0.85,
        **({} if cuda else {"num_kv_blocks": 40000})), served_model_name=args.shape)
    await engine.start()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 120000) for _ in range(rng.randint(100, 1024))] for _ in range(args.requests)]
    try:
        first = await _burst(engine, "first", prompts, args.max_tokens)
        repeat = await _burst(engine, "repeat", prompts, args.max_tokens)
    finally:
        await engine.shutdown()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)", "shape": args.shape,
            "requests": args.requests, "first_burst": first, "repeated_burst": repeat,
            "repeat_ttft_p99_over_first": repeat["ttft_ms_p99"] / first["ttft_ms_p99"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
