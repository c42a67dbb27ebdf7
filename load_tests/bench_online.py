"""Online serving against the engine offline: the same requests, one GPU, one run.

The workload of the engine-core issue: N requests sent at once (default 256), prompt and output
lengths uniform on [100, 1024], token-id prompts, forced lengths (`ignore_eos`), greedy. Two
populations: the base model, and 100 rank-16 q,k,v,o adapters with uniform popularity.

- offline: `LLMEngine` (the engine `quiver serve` drives, one step in flight), the requests
  added at once and stepped to the end in this process; output tokens/s and the mean decode
  step time.
- online: `python -m server serve` in a child process (`--load-format dummy`, the same engine
  settings), the same requests through the `openai` client, streamed `/v1/completions`; output
  tokens/s from the first send to the last token, TTFT and inter-token latency percentiles.
  Adapters are loaded (one request each) before the timed run, as the offline engine has them.

    python load_tests/bench_online.py --out load_tests/results/online-vs-offline [--shape llama-1b]

Writes OUT.json (keys `device`, `online_over_offline_base`, `online_over_offline_adapters`,
`itl_p50_ms`, `offline_step_ms`, ...) and OUT.md. `--device cpu --layers 1 --requests 8
--lengths 8 24` is a smoke run (figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from load_tests.client import DriverConfig, RequestRecord, run_workload  # noqa: E402
from load_tests.local_server import SubprocessServer  # noqa: E402
from load_tests.model_dir import write_model_dir  # noqa: E402
from load_tests.synthetic_adapters import write_adapters  # noqa: E402
from load_tests.workload import PlannedRequest  # noqa: E402


def plan(n: int, lengths: tuple[int, int], vocab: int, adapters: int, seed: int) -> list[PlannedRequest]:
    """All requests at t=0; adapter index uniform over `adapters` (None: the base model)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt_len, output_len = (int(x) for x in rng.integers(lengths[0], lengths[1] + 1, 2))
        prompt = tuple(int(t) for t in rng.integers(10, vocab, prompt_len))
        adapter = int(rng.integers(0, adapters)) if adapters else None
        out.append(PlannedRequest(i, 0.0, adapter, prompt_len, output_len, prompt))
    return out


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings both sides run with (EngineConfig fields and their CLI flags)."""
    cuda = args.device == "cuda"
    return {"max_model_len": 2 * args.lengths[1] + 16, "max_num_seqs": args.requests,
            "max_num_batched_tokens": args.max_batched_tokens, "max_loras": args.slots, "max_lora_rank": 16,
            "dtype": "bfloat16" if cuda else "float32", "device": args.device,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            **({} if cuda else {"num_kv_blocks": args.cpu_kv_blocks})}


def offline(model_dir: Path, root: Path, requests: list[PlannedRequest], names: list[str],
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", **engine_settings(args)),
                       adapter_config=AdapterConfig(adapter_root=root, max_cpu_adapters=max(len(names), args.slots)))
    try:
        for i, name in enumerate(names):  # one short request each, untimed, as the online run warms up
            engine.add_request(f"warm{i}", [11, 12, 13, 14], SamplingParams(max_tokens=2, ignore_eos=True), name)
        while engine.has_unfinished():
            engine.step()
        for r in requests:
            params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            engine.add_request(f"r{r.index}", list(r.prompt_token_ids), params,
                               None if r.adapter is None else names[r.adapter])
        sync()
        started = time.perf_counter()
        tokens, steps, decode_s = 0, 0, 0.0
        while engine.has_unfinished():
            t = time.perf_counter()
            tokens += sum(len(d.token_ids) for d in engine.step())
            dt = time.perf_counter() - t
            launched = engine._inflight  # the step this call launched (the bench reads the engine's own record)
            if launched is not None and not launched.batch.is_prefill:
                steps, decode_s = steps + 1, decode_s + dt
        sync()
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    return {"output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds,
            "decode_step_ms": 1e3 * decode_s / max(1, steps)}


def online(model_dir: Path, root: Path, requests: list[PlannedRequest], names: list[str],
           args: argparse.Namespace, log: Path) -> dict[str, Any]:  # fmt: skip
    settings = engine_settings(args)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    serve = ["--model", str(model_dir), "--load-format", "dummy", "--adapter-root", str(root),
             "--max-cpu-adapters", str(max(len(names), args.slots)), *flags]
    with SubprocessServer(serve, log_path=log) as server:
        server.start(timeout_s=600)
        driver = DriverConfig(base_url=server.base_url, endpoint="completions", timeout_s=args.timeout)
        model_of = (lambda i: args.shape if i is None else names[i])  # noqa: E731
        if names:  # load every adapter once, untimed
            warm = [PlannedRequest(i, 0.0, i, 4, 2, (11, 12, 13, 14)) for i in range(len(names))]
            asyncio.run(run_workload(warm, driver, model_of, deadline_s=args.timeout))
        records = asyncio.run(run_workload(requests, driver, model_of, deadline_s=args.timeout))
    return summarize(records)


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    if not ok:
        raise RuntimeError(f"no request succeeded: {records[0].error_type}: {records[0].error_message}")
    first = min(r.sent for r in ok if r.sent is not None)
    last = max(r.done for r in ok if r.done is not None)
    tokens = sum(r.num_output_tokens for r in ok)
    itls = [gap for r in ok for gap in r.itls]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {"requests": len(records), "failed": len(records) - len(ok), "output_tokens": tokens,
            "seconds": last - first, "output_tok_s": tokens / (last - first),
            "itl_ms": {"p50": 1e3 * float(np.percentile(itls, 50)), "p99": 1e3 * float(np.percentile(itls, 99))},
            "ttft_ms": {"p50": 1e3 * statistics.median(ttfts), "p99": 1e3 * float(np.percentile(ttfts, 99))}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(tmp / args.shape, args.shape, args.layers)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    root = tmp / "adapters"
    names = sorted(write_adapters(model_dir, root, args.adapters, rank=16, seed=3))
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run)",
                           "shape": args.shape if args.layers is None else f"{args.shape} ({args.layers} layers)",
                           "requests": args.requests, "lengths": list(args.lengths), "engine": engine_settings(args)}
    for label, adapter_names in (("base", []), ("adapters", names)):
        requests = plan(args.requests, tuple(args.lengths), vocab, len(adapter_names), seed=7)
        off = offline(model_dir, root, requests, adapter_names, args)
        on = online(model_dir, root, requests, adapter_names, args, tmp / f"server-{label}.log")
        out[label] = {"offline": off, "online": on, "online_over_offline": on["output_tok_s"] / off["output_tok_s"]}
        print(label, json.dumps(out[label]), flush=True)
    out.update(online_over_offline_base=out["base"]["online_over_offline"],
               online_over_offline_adapters=out["adapters"]["online_over_offline"],
               itl_p50_ms=out["base"]["online"]["itl_ms"]["p50"], offline_step_ms=out["base"]["offline"]["decode_step_ms"])
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [f"# Online against offline, {r['shape']} ({r['device']})", "", f"`{command}`", "",
             f"{r['requests']} requests at once, lengths uniform on {r['lengths']}, greedy, forced lengths.", "",
             "| run | offline tok/s | online tok/s | online / offline | offline decode step | online ITL p50 | "
             "ITL p99 | TTFT p50 | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for label in ("base", "adapters"):
        off, on = r[label]["offline"], r[label]["online"]
        lines.append(f"| {label} | {off['output_tok_s']:,.0f} | {on['output_tok_s']:,.0f} | "
                     f"{r[label]['online_over_offline']:.2f} | {off['decode_step_ms']:.2f} ms | "
                     f"{on['itl_ms']['p50']:.2f} ms | {on['itl_ms']['p99']:.2f} ms | {on['ttft_ms']['p50']:.0f} ms | "
                     f"{on['failed']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--lengths", type=int, nargs=2, default=[100, 1024], help="prompt and output lengths: low high")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--max-batched-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--cpu-kv-blocks", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python load_tests/bench_online.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()
