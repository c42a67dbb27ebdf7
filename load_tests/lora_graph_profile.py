"""Kernel table of one large-batch LoRA decode graph replay (llama-1b shape), GPU only.

What a decode step with adapters spends beyond the base step, kernel by kernel: the offline
benchmark's 128-adapter run decodes ~145 sequences a step, replayed from the 256-row graph.

    python load_tests/lora_graph_profile.py --out DIR [--batch 256] [--adapters 128]

Writes DIR/lora-graph-profile.txt (torch.profiler table per kernel name, base and LoRA
graphs) and prints the replay GPU times of both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.bench import _warm  # noqa: E402
from load_tests.bench_quiver import QKVO, QuiverOffline, assign_adapters, hf_config, make_requests  # noqa: E402
from load_tests.gpu_timing import replay_ms  # noqa: E402


def table(graph: torch.cuda.CUDAGraph, replays: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    busy: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    rows = sorted(busy.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"{'us/replay':>10} {'calls':>6} {'us/call':>8}  kernel"]
    for name, t in rows[:30]:
        lines.append(f"{sum(t) / replays:10.1f} {len(t) / replays:6.0f} {sum(t) / len(t):8.2f}  {name[:100]}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    q = QuiverOffline(hf_config("llama-1b"), num_slots=512, max_rank=16, max_num_seqs=256, max_model_len=2048,
                      max_batched_tokens=16384, graph_max_batch=256)  # fmt: skip
    q.load_adapters(args.adapters, [16], QKVO)
    reqs = assign_adapters(make_requests(args.batch, 3, 128256, (100, 300), (8, 9)), args.adapters, 1.0, 3)
    _warm(q, reqs)
    q.run(reqs)  # LoRA graphs captured; buffers hold a real batch of `batch` rows
    graphs = q.runner.graphs
    out = []
    for lora in (False, True):
        graph = graphs._graphs[(args.batch, lora)]
        ms = replay_ms(graph)
        print(f"batch {args.batch} lora={lora}: replay {ms:.3f} ms", flush=True)
        out.append(f"# batch {args.batch}, lora={lora}, replay {ms:.3f} ms\n" + table(graph))
    (args.out / "lora-graph-profile.txt").write_text("\n".join(out))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
