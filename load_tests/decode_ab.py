"""Single stream on the llama-8b shape through the serving engine, variants interleaved.

Batch 1, bf16, random weights (`--load-format dummy`), a 128-token prompt and forced output
lengths, greedy. Every variant runs on one `LLMEngine` (one model, one KV pool): each has its
own decode graphs, captured with its switches set, and rounds run the variants in turn, so
the ratios are not drowned by what differs between processes or machine starts (on an H100
a later phase of load_tests/bench.py runs 0.1-0.3 ms/token slower than the first, whatever
it measures). Per variant and round: ms per output token as a client sees it (from the first
token's delta to the last) and the GPU time of one batch-1 graph replay; medians over rounds.

    python load_tests/decode_ab.py --out DIR [--rounds 5] [--tokens 256] [--variants a,b]

Variants (engine switches):
    cublas_sync     cuBLAS matmuls, no PDL, one step at a time      (the engine before GEMV/PDL/overlap)
    gemv_pdl_sync   Triton GEMV + programmatic dependent launch, one step at a time
    gemv_pdl_async  the same with one step in flight                 (the default)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig  # noqa: E402
from engine.kernels import pdl as pdl_switch  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.layers import set_gemv  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from load_tests.gpu_timing import replay_ms  # noqa: E402
from load_tests.model_dir import write_model_dir  # noqa: E402
from load_tests.synthetic_adapters import DEFAULT_TARGETS, write_adapter  # noqa: E402

FLOOR_MS = 4.48  # llama-8b: 15.0 GB of weights read per token at the H100's datasheet 3.35 TB/s
VARIANTS = {
    "cublas_sync": dict(gemv=False, pdl=False, overlap=False),
    "gemv_pdl_sync": dict(gemv=True, pdl=True, overlap=False),
    "gemv_pdl_async": dict(gemv=True, pdl=True, overlap=True),
}


@contextlib.contextmanager
def switches(engine: LLMEngine, gemv: bool, pdl: bool, overlap: bool) -> Iterator[None]:
    set_gemv(gemv)
    pdl_switch.set_enabled(pdl)
    engine.config.async_scheduling = overlap
    try:
        yield
    finally:
        set_gemv(True)
        pdl_switch.set_enabled(True)
        engine.config.async_scheduling = True


def stream(engine: LLMEngine, prompt: list[int], tokens: int, adapter: str | None) -> float:
    """ms per output token between the first and the last token's delta."""
    engine.add_request(f"s{time.monotonic_ns()}", prompt,
                       SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), adapter)  # fmt: skip
    stamps = []
    while engine.has_unfinished():
        for delta in engine.step():
            stamps += [time.perf_counter()] * len(delta.token_ids)
    return 1e3 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def replay_gpu_ms(engine: LLMEngine, lora: bool) -> float:
    return replay_ms(engine.runner.graphs._graphs[(1, lora)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(tmp / "llama-8b", "llama-8b")
    config = json.loads((model_dir / "config.json").read_text())
    adapter_dir = write_adapter(tmp / "a16", config, rank=16, targets=DEFAULT_TARGETS, seed=1, base_name=str(model_dir))
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                    max_model_len=512, max_num_seqs=1, cuda_graph_max_batch=1, max_loras=2,
                                    max_lora_rank=16, enable_prefix_caching=False),
                       {"a16": adapter_dir})  # fmt: skip
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = config["vocab_size"]
    prompt = lambda: rng.integers(0, vocab, 128).tolist()  # noqa: E731
    graphs = {}
    for name in names:  # capture each variant's graphs (base and LoRA) under its switches
        with switches(engine, **VARIANTS[name]):
            engine.runner.capture_decode_graphs(1, engine.max_model_len)
            stream(engine, prompt(), 8, None)
            stream(engine, prompt(), 8, "a16")  # the LoRA graphs are captured at first use
            graphs[name] = engine.runner.graphs
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for _ in range(args.rounds):
        for name in names:
            engine.runner.graphs = graphs[name]
            with switches(engine, **VARIANTS[name]):
                for label, adapter in (("base", None), ("adapter", "a16")):
                    ms = stream(engine, prompt(), args.tokens, adapter)
                    rows[name].setdefault(f"{label}_ms_per_token", []).append(ms)
                    rows[name].setdefault(f"{label}_gpu_ms", []).append(replay_gpu_ms(engine, adapter is not None))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "setup_s": setup_s, "rounds": args.rounds,
              "tokens": args.tokens, "prompt_len": 128, "floor_ms": FLOOR_MS, "variants": {}}  # fmt: skip
    for name in names:
        med = {k: statistics.median(v) for k, v in rows[name].items()}
        med["base_vs_floor"] = med["base_ms_per_token"] / FLOOR_MS
        med["adapter_vs_base"] = med["adapter_ms_per_token"] / med["base_ms_per_token"]
        result["variants"][name] = med | {"samples": rows[name]}
        print(name, json.dumps({k: round(v, 4) for k, v in med.items()}), flush=True)
    (args.out / "decode_ab.json").write_text(json.dumps(result, indent=1))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
