"""Batch-1 decode variants of one llama-8b model, measured interleaved: a clean A/B.

Phases of load_tests/bench.py build a fresh model each, and on an H100 a later phase runs
0.1-0.3 ms/token slower than the first whatever it measures (two orders of the same pair
disagree by that much), which drowns the changes being measured. Here one model and one KV
pool serve every variant: each variant's decode graph is captured with its switches set,
then rounds replay the variants in turn (single-stream ms/token through the scheduler,
sampler and graph, and the GPU time of one graph replay), and the medians over rounds are
compared.

    python load_tests/decode_ab.py --out DIR [--rounds 5] [--variants cublas,gemv,...]

Variants (engine switches at capture time):
    cublas        every matmul on cuBLAS, no PDL              (before engine/kernels/triton_gemv.py)
    gemv          Triton GEMV, no PDL
    gemv_pdl      + programmatic dependent launch            (engine/kernels/pdl.py; the default)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cuda_graphs import DecodeGraphs  # noqa: E402
from engine.kernels import pdl  # noqa: E402
from engine.models.layers import set_gemv  # noqa: E402
from load_tests.bench_quiver import QKVO, QuiverOffline, hf_config  # noqa: E402

FLOOR_MS = 4.48  # llama-8b: 15.0 GB of weights per token at the H100's datasheet 3.35 TB/s
VARIANTS = {
    "cublas": dict(gemv=False, pdl=False),
    "gemv": dict(gemv=True, pdl=False),
    "gemv_pdl": dict(gemv=True, pdl=True),
}


@contextlib.contextmanager
def switches(gemv: bool, pdl_on: bool) -> Iterator[None]:
    set_gemv(gemv)
    pdl.set_enabled(pdl_on)
    try:
        yield
    finally:
        set_gemv(True)
        pdl.set_enabled(True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--adapter", action="store_true", help="also measure one rank-16 q,k,v,o adapter")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    q = QuiverOffline(hf_config("llama-8b"), num_slots=2, max_rank=16, max_num_seqs=1, max_model_len=512,
                      max_batched_tokens=512, graph_max_batch=1, enforce_eager=True)  # fmt: skip
    q.load_adapters(1, [16], QKVO)
    lora_modules = q.runner._lora_modules()
    graphs: dict[str, DecodeGraphs] = {}
    for name in names:
        v = VARIANTS[name]
        with switches(v["gemv"], v["pdl"]):
            q.runner.capture_decode_graphs(1, 512)
            graphs[name] = q.runner.graphs
            if args.adapter:
                g = graphs[name]
                g.capture_lora(sum(m.live_version for m in lora_modules))
    slots = [-1, 0] if args.adapter else [-1]
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for _ in range(args.rounds):
        for name in names:
            q.runner.graphs = graphs[name]
            for slot in slots:
                r = q.single_stream(128, args.tokens, slot, repeats=1)
                label = "base" if slot < 0 else "adapter"
                rows[name].setdefault(f"{label}_ms_per_token", []).append(r["ms_per_token"])
                rows[name].setdefault(f"{label}_gpu_ms", []).append(r["graph_replay_gpu_ms"])
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds, "tokens": args.tokens,
              "floor_ms": FLOOR_MS, "variants": {}}  # fmt: skip
    for name in names:
        med = {k: statistics.median(v) for k, v in rows[name].items()}
        med["base_vs_floor"] = med["base_ms_per_token"] / FLOOR_MS
        if args.adapter:
            med["adapter_vs_base"] = med["adapter_ms_per_token"] / med["base_ms_per_token"]
        result["variants"][name] = med | {"samples": rows[name]}
        print(name, json.dumps({k: round(v, 4) for k, v in med.items()}), flush=True)
    (args.out / "decode_ab.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
