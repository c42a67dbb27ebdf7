"""Adapter cold starts on the llama-8b shape: what a request pays for an adapter not yet on the GPU.

Through the serving engine (`AsyncEngine`, the object `quiver serve` drives; no HTTP), bf16,
random weights (`load_format="dummy"`), 8 GPU slots. Two adapter kinds: rank-16 q,k,v,o (27 MB
in bf16) and all-linear rank 64 (336 MB). Measured:

- promote: host memory -> a GPU slot (`LoraSlots.load` plus a device sync), each kind, 20 times;
- arrival to first token (a 128-token prompt) with the adapter in a GPU slot (warm), in host
  memory only, and on disk only (registered under the adapter root, never loaded; the files
  were just written, so they are in the page cache, as on a server with RAM to spare);
- a thrash run: 64 rank-16 adapters in host memory, 8 GPU slots, zipf(1.0) popularity, Poisson
  arrivals at 4 req/s, 128-512-token prompts, 64 output tokens; TTFT percentiles. The same again
  with every adapter on disk at the start (cold), reported alongside.

    python load_tests/cold_start.py --out load_tests/results/cold-start [--thrash-seconds 45]

Writes OUT.json (keys `device`, `promote_host_to_gpu_ms_p50`, `disk_to_first_token_extra_ms`,
`thrash_ttft_p99_over_p50`, ...) and OUT.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.config import AdapterConfig  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from load_tests.model_dir import write_model_dir  # noqa: E402
from load_tests.synthetic_adapters import DEFAULT_TARGETS, write_adapter  # noqa: E402

ALL_LINEAR = (*DEFAULT_TARGETS, "gate_proj", "up_proj", "down_proj")
KINDS = {"r16_qkvo": (16, DEFAULT_TARGETS), "r64_all_linear": (64, ALL_LINEAR)}
PROMPT_LEN = 128
TRIALS = {"r16_qkvo": 10, "r64_all_linear": 4}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def first_token_ms(engine: AsyncEngine, rid: str, prompt: list[int], adapter: str | None,
                         max_tokens: int = 1) -> tuple[float, str | None]:  # fmt: skip
    """Arrival to first token, in ms, and the finish reason."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first, finish = None, None
    async for delta in engine.generate(rid, prompt, params, adapter):
        if first is None and delta.token_ids:
            first = (time.perf_counter() - started) * 1e3
        finish = delta.finish_reason
    return (first if first is not None else float("nan")), finish


def timed_slot_copy(core: Any, name: str, slot: int) -> float:
    """Engine thread: copy `name`'s host weights into a free slot, wait for the device; ms."""
    entry = core.adapters.host.get(core.identity.get(name).adapter_id)
    sync = torch.cuda.synchronize if core.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    core.lora.load(slot, entry.weights)
    sync()
    ms = (time.perf_counter() - started) * 1e3
    core.lora.clear(slot)
    sync()
    return ms


async def measure_tiers(engine: AsyncEngine, root: Path, config: dict, rng: random.Random,
                        trials: int | None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    prompt = [rng.randrange(10, 120000) for _ in range(PROMPT_LEN)]
    for kind, (rank, targets) in KINDS.items():
        names = []
        for i in range(trials or TRIALS[kind]):
            name = f"{kind}-{i}"
            write_adapter(root / name, config, rank=rank, targets=targets, seed=1000 + i)
            names.append(name)
        disk, host, warm = [], [], []
        for name in names:
            # Disk: registered by the root, never loaded.
            ms, finish = await first_token_ms(engine, f"{name}-disk", prompt, name)
            assert finish == "length", finish
            disk.append(ms)
            # Warm: now in a GPU slot.
            for j in range(3):
                ms, _ = await first_token_ms(engine, f"{name}-warm{j}", prompt, name)
                warm.append(ms)
            # Host: demoted out of its slot, still in host memory.
            await engine.demote_adapter(name)
            ms, _ = await first_token_ms(engine, f"{name}-host", prompt, name)
            host.append(ms)
        base = [(await first_token_ms(engine, f"{kind}-base{j}", prompt, None))[0] for j in range(5)]
        copies = [await engine.call(lambda core, n=names[0]: timed_slot_copy(core, n, 7)) for _ in range(20)]
        size = (await engine.adapter_info(names[0])).get("size_bytes")
        # Each adapter's disk -> host memory load (read, validate, fold, page-lock, plan), ms.
        load_ms = [(await engine.adapter_info(n)).get("load_ms") for n in names]
        out[kind] = {
            "size_bytes": size,
            "promote_host_to_gpu_ms": {"p50": statistics.median(copies), "min": min(copies), "max": max(copies)},
            "ttft_ms": {
                "base": statistics.median(base),
                "gpu_slot": statistics.median(warm),
                "host": statistics.median(host),
                "disk": statistics.median(disk),
                "disk_max": max(disk),
            },
            "disk_to_first_token_extra_ms": statistics.median(disk) - statistics.median(warm),
            "disk_to_host_load_ms": load_ms,
            "host_to_first_token_extra_ms": statistics.median(host) - statistics.median(warm),
        }
        print(kind, json.dumps(out[kind]), flush=True)
    return out


class GcPauses:
    """Collections (and their durations) by generation while the benchmark runs."""

    def __init__(self) -> None:
        self._started: float | None = None
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1e3)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"gen{g}": {"count": len(p), "max_ms": round(max(p, default=0.0), 2)} for g, p in self.pauses.items()}


def zipf_weights(n: int, alpha: float) -> list[float]:
    raw = [1.0 / (i + 1) ** alpha for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


async def thrash(engine: AsyncEngine, names: list[str], seconds: float, rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    weights = zipf_weights(len(names), 1.0)
    tasks, picks, arrivals = [], [], []
    in_flight: dict[int, str] = {}  # request index -> adapter, until its stream ends

    async def one(i: int, name: str, prompt: list[int]) -> tuple[float, str | None]:
        in_flight[i] = name
        try:
            return await first_token_ms(engine, f"thrash{seed}-{i}", prompt, name, max_tokens=64)
        finally:
            del in_flight[i]

    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        name = rng.choices(names, weights)[0]
        prompt = [rng.randrange(10, 120000) for _ in range(rng.randint(128, 512))]
        # What the request meets: how many streams run, over how many distinct adapters, and
        # whether its own adapter is among them (then it needs no free slot).
        others = set(in_flight.values())
        arrivals.append({"at_s": round(time.perf_counter() - started, 3), "adapter": name,
                         "prompt_tokens": len(prompt), "in_flight": len(in_flight),
                         "distinct_in_flight": len(others), "own_in_flight": name in others})
        picks.append(name)
        tasks.append(asyncio.create_task(one(i, name, prompt)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    ttft = [ms for ms, _ in results]
    failed = sum(1 for _, finish in results if finish != "length")
    p50, p99 = pct(ttft, 50), pct(ttft, 99)
    slowest = sorted(range(len(ttft)), key=lambda k: -ttft[k])[:6]
    return {
        "requests": len(results),
        "failed": failed,
        "distinct_adapters": len(set(picks)),
        "ttft_ms": {"p50": p50, "p90": pct(ttft, 90), "p99": p99, "max": max(ttft)},
        "p99_over_p50": p99 / p50,
        "max_over_p50": max(ttft) / p50,
        "slowest": [{**arrivals[k], "ttft_ms": round(ttft[k], 1)} for k in slowest],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(tmp / args.shape, args.shape, args.layers)
    config = json.loads((model_dir / "config.json").read_text())
    root = tmp / "root"
    root.mkdir()
    thrash_dir = tmp / "thrash"
    thrash_names = [f"t{i:02d}" for i in range(64)]
    for i, name in enumerate(thrash_names):
        write_adapter(thrash_dir / name, config, rank=16, targets=DEFAULT_TARGETS, seed=i, base_name=str(model_dir))
    cuda = args.device == "cuda"
    engine_config = EngineConfig(model=str(model_dir), load_format="dummy", device=args.device,
                                 dtype="bfloat16" if cuda else "float32", max_model_len=2048, max_num_seqs=64,
                                 max_loras=8, max_lora_rank=64, gpu_memory_utilization=0.85,
                                 **({} if cuda else {"num_kv_blocks": 2048}))
    engine = AsyncEngine(engine_config, served_model_name=args.shape,
                         adapter_config=AdapterConfig(adapter_root=root, max_cpu_adapters=80, load_workers=2))
    await engine.start()
    try:
        rng = random.Random(0)
        warm = [rng.randrange(10, 120000) for _ in range(PROMPT_LEN)]
        for j in range(3):
            await first_token_ms(engine, f"warmup{j}", warm, None, max_tokens=8)
        # As `quiver serve` does once it is up (server/app.py): what is alive now is never
        # collected, so a full collection does not walk the model's objects mid-request.
        gc.collect()
        gc.freeze()
        pauses = GcPauses()
        tiers = await measure_tiers(engine, root, config, rng, args.trials)
        # Cold thrash: every adapter on disk at the start.
        for name in thrash_names:
            await engine.call(lambda core, n=name: core.identity.register(n, _source(thrash_dir / n)))
        cold = await thrash(engine, thrash_names, args.thrash_seconds, args.rate, seed=1)
        print("thrash cold", json.dumps(cold), flush=True)
        # Host-warm thrash: all 64 in host memory, 8 GPU slots. The cold run touched only the
        # adapters it drew; load the others too (promote, then demote: back to host memory).
        for name in thrash_names:
            await engine.promote_adapter(name)
            await engine.demote_adapter(name)
        warm_run = await thrash(engine, thrash_names, args.thrash_seconds, args.rate, seed=2)
        print("thrash host-warm", json.dumps(warm_run), flush=True)
        counters = engine.adapter_counters()
        pauses.stop()
    finally:
        await engine.shutdown()
    r16 = tiers["r16_qkvo"]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run: figures mean nothing)",
        "shape": args.shape if args.layers is None else f"{args.shape} ({args.layers} layers)",
        "promote_host_to_gpu_ms_p50": r16["promote_host_to_gpu_ms"]["p50"],
        "disk_to_first_token_extra_ms": r16["disk_to_first_token_extra_ms"],
        "thrash_ttft_p99_over_p50": warm_run["p99_over_p50"],
        "thrash_cold_ttft_p99_over_p50": cold["p99_over_p50"],
        "adapters": tiers,
        "thrash": {"host_warm": warm_run, "cold_start": cold, "gpu_slots": 8, "adapters": 64, "zipf_alpha": 1.0,
                   "rate_per_s": args.rate, "seconds": args.thrash_seconds},
        "adapter_counters": counters,
        "gc_pauses_ms": pauses.summary(),
    }


def _source(path: Path):
    from adapters.sources import source_from_operator

    return source_from_operator(path)


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [f"# Adapter cold starts, {r['shape']} shape ({r['device']})", "", f"`{command}`", "",
             "| adapter | size | promote host->GPU p50 | TTFT base | TTFT in GPU slot | TTFT in host | "
             "TTFT on disk | disk extra over warm |", "|---|---|---|---|---|---|---|---|"]
    for kind, a in r["adapters"].items():
        t = a["ttft_ms"]
        lines.append(f"| {kind} | {a['size_bytes'] / 2**20:.0f} MiB | {a['promote_host_to_gpu_ms']['p50']:.2f} ms | "
                     f"{t['base']:.1f} ms | {t['gpu_slot']:.1f} ms | {t['host']:.1f} ms | {t['disk']:.1f} ms | "
                     f"{a['disk_to_first_token_extra_ms']:.1f} ms |")
    lines += ["", "| thrash (64 adapters, zipf 1.0, 8 GPU slots, 4 req/s) | requests | failed | TTFT p50 | p90 | "
              "p99 | max | p99/p50 |", "|---|---|---|---|---|---|---|---|"]
    for label, key in (("all in host memory at the start", "host_warm"), ("all on disk at the start", "cold_start")):
        t = r["thrash"][key]
        lines.append(f"| {label} | {t['requests']} | {t['failed']} | {t['ttft_ms']['p50']:.1f} ms | "
                     f"{t['ttft_ms']['p90']:.1f} ms | {t['ttft_ms']['p99']:.1f} ms | {t['ttft_ms']['max']:.1f} ms | "
                     f"{t['p99_over_p50']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("--thrash-seconds", type=float, default=45.0)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--shape", default="llama-8b", choices=["llama-1b", "llama-8b"])
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--trials", type=int, default=None, help="disk/host/warm trials per adapter kind")
    args = p.parse_args()
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python load_tests/cold_start.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
