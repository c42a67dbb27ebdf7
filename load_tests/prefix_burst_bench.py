"""Scheduler cost of a burst of repeated prompts (every prompt a full prefix-cache hit).

Reproduces the host side of "the same 256 prompts sent twice produce no token for 15 s": a
KV pool of an H100's size for the llama-1b shape (~127k blocks of 16 tokens), 256 prompts of
uniform length [100, 1024], each served once (computed, published, finished) and then sent
again. The second burst's admission is timed: every prompt block is a cache hit, so each hit
takes its block off the free list. No torch, no GPU: the scheduler is plain Python.

    python load_tests/prefix_burst_bench.py [--blocks 127000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from scheduler import Scheduler, SchedulerConfig, Sequence


def _burst(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(rng.randint(100, 1024))] for _ in range(n)]


def _serve_prefill(sched: Scheduler, prompts: list[list[int]], first_id: int) -> tuple[float, int]:
    """Admit every prompt (prefill steps until all run), publish their KV, finish them.
    Returns (seconds spent in schedule(), number of prefill steps)."""
    seqs = [Sequence(seq_id=first_id + i, prompt_token_ids=p, max_tokens=1) for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.add(seq)
    spent, steps = 0.0, 0
    while sched.num_waiting:
        started = time.perf_counter()
        batch = sched.schedule()
        spent += time.perf_counter() - started
        if not batch.is_prefill:
            raise RuntimeError("the burst did not fit: raise --blocks")
        steps += 1
        sched.update(batch, [0] * len(batch.seqs))
    for seq in seqs:
        sched.finish(seq)
    return spent, steps


def run(num_blocks: int, num_prompts: int, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=16, max_num_seqs=num_prompts,
                                      max_num_batched_tokens=16384, max_model_len=2048,
                                      enable_prefix_caching=True))
    prompts = _burst(rng, num_prompts, 128256)
    cold_s, cold_steps = _serve_prefill(sched, prompts, 0)
    hit_s, hit_steps = _serve_prefill(sched, prompts, num_prompts)
    return {
        "num_blocks": num_blocks,
        "num_prompts": num_prompts,
        "cold_schedule_s": round(cold_s, 4),
        "cold_prefill_steps": cold_steps,
        "repeat_schedule_s": round(hit_s, 4),
        "repeat_prefill_steps": hit_steps,
        "cache_hit_blocks": sched.block_manager.num_cache_hits,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=127_000)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = run(args.blocks, args.prompts, args.seed)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
