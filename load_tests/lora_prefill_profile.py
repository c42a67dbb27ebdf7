"""Where an adapter request's prefill spends its time beyond the base model's (GPU).

Through `LLMEngine` (the serving engine, one step at a time), llama-8b shape, bf16 random
weights: a prompt of PROMPT tokens, one output token, with no adapter and with a rank-16
q,k,v,o adapter already in a GPU slot. Prints the median step times of both and the
torch.profiler tables (host-side self time, device kernels) of the adapter step, so the extra
milliseconds can be named.

    python load_tests/lora_prefill_profile.py --out DIR [--shape llama-8b] [--prompt 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.config import AdapterConfig  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from load_tests.model_dir import write_model_dir  # noqa: E402
from load_tests.synthetic_adapters import DEFAULT_TARGETS, write_adapter  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_ms(engine: LLMEngine, rid: str, prompt: list[int], adapter: str | None) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    sync()
    started = time.perf_counter()
    engine.add_request(rid, prompt, params, adapter)
    while engine.has_unfinished():
        engine.step()
    sync()
    return (time.perf_counter() - started) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])

    tmp = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(tmp / args.shape, args.shape, args.layers)
    import json

    config = json.loads((model_dir / "config.json").read_text())
    write_adapter(tmp / "root" / "r16", config, rank=16, targets=DEFAULT_TARGETS, seed=1, base_name=str(model_dir))
    engine = LLMEngine(
        EngineConfig(model=str(model_dir), load_format="dummy", device=args.device,
                     dtype="bfloat16" if args.device == "cuda" else "float32",
                     max_model_len=2048, max_num_seqs=64, max_loras=8, max_lora_rank=64,
                     gpu_memory_utilization=0.5, **({} if args.device == "cuda" else {"num_kv_blocks": 256})),
        adapter_config=AdapterConfig(adapter_root=tmp / "root"),
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 30000, (args.prompt,), generator=gen).tolist() for _ in range(2 * args.trials + 4)]
    for i in range(4):  # warm both paths (kernel compiles, adapter load)
        prefill_ms(engine, f"w{i}", prompts[i], "r16" if i % 2 else None)
    base = [prefill_ms(engine, f"b{i}", prompts[4 + i], None) for i in range(args.trials)]
    lora = [prefill_ms(engine, f"l{i}", prompts[4 + args.trials + i], "r16") for i in range(args.trials)]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"{args.shape}, prompt {args.prompt} tokens, {device_name}",
             f"prefill step, median of {args.trials}: base {statistics.median(base):.2f} ms, "
             f"r16 q,k,v,o adapter {statistics.median(lora):.2f} ms"]
    for label, adapter in (("base", None), ("adapter", "r16")):
        with profile(activities=activities) as prof:
            prefill_ms(engine, f"p-{label}", prompts[0], adapter)
        lines.append(f"\n== {label}: host self time")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if args.device == "cuda":
            lines.append(f"\n== {label}: device kernels")
            lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    engine.close()
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (args.out / f"lora-prefill-profile-{args.shape}.txt").write_text(text)
    print("\n".join(lines[:2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
