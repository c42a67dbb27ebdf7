"""Tensor-parallel offline benchmark: llama-8b at TP=1 and TP=2, and a 70B-class model at TP=2.

    python load_tests/bench_tp.py --out DIR [--budget-s 240] [--phases a,b] [--smoke] [--device cpu]

Each phase runs in its own process group (a clean GPU; TP=2 spawns its worker from there)
under what is left of the time budget; results go to DIR/bench_tp.json after every
measurement, so a run cut short keeps what it measured, and DIR/bench_tp.md is rendered at
the end. Random weights of real shapes (`load_format="dummy"`: only a config.json on disk),
bf16, greedy, forced output lengths, one workload for every phase. Scaling efficiency is
TP=2 throughput / (2 x TP=1 throughput). `--smoke --device cpu` runs every code path on
2-layer models over gloo, to check the plumbing without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig  # noqa: E402
from engine.kv_cache import kv_cache_bytes_per_block  # noqa: E402
from engine.lora.slots import LoraSlots  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.loader import load_model  # noqa: E402
from engine.tp_driver import TensorParallelDriver  # noqa: E402
from load_tests.bench_quiver import (  # noqa: E402
    BLOCK_SIZE,
    QKVO,
    SHAPES,
    QuiverOffline,
    Request,
    _Weights,
    assign_adapters,
    make_requests,
)

LLAMA_70B = dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)  # fmt: skip
# phase -> (shape, tensor_parallel_size, estimated seconds with process start-up)
PHASES = {"llama8b_tp1": ("llama-8b", 1, 45), "llama8b_tp2": ("llama-8b", 2, 55), "llama70b_tp2": ("llama-70b", 2, 75)}
VOCAB = 128256
WORKLOAD = dict(requests=128, prompt_len=(64, 384), output_len=(32, 192), seed=0)
SMOKE_WORKLOAD = dict(requests=8, prompt_len=(8, 24), output_len=(4, 8), seed=0)


# --smoke --device cpu: the same code paths on a model small enough for a laptop.
CPU_SMOKE = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)  # fmt: skip


def model_config(shape: str, num_layers: int | None, cpu_smoke: bool = False):
    from transformers import LlamaConfig

    kwargs = dict(LLAMA_70B if shape == "llama-70b" else SHAPES[shape])
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    if cpu_smoke:
        kwargs = dict(CPU_SMOKE)
    cfg = LlamaConfig(vocab_size=1024 if cpu_smoke else VOCAB, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs)  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


class TPOffline(QuiverOffline):
    """`QuiverOffline` (the same run loop) over a model sharded on `tp` ranks, built as `LLMEngine` does."""

    def __init__(self, cfg, tp: int, device: str, *, num_slots: int, max_rank: int, max_num_seqs: int,
                 max_model_len: int, max_batched_tokens: int, graph_max_batch: int,
                 utilization: float = 0.9) -> None:  # fmt: skip
        t0 = time.perf_counter()
        self.cfg = cfg
        self._dir = tempfile.TemporaryDirectory(prefix="quiver-bench-tp-")
        cfg.save_pretrained(self._dir.name)  # a config.json and nothing else: load_format="dummy"
        cuda = device == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        config = EngineConfig(model=self._dir.name, device=device, dtype="bfloat16" if cuda else "float32",
                              tensor_parallel_size=tp, load_format="dummy")  # fmt: skip
        self.driver = TensorParallelDriver.launch(config) if tp > 1 else None
        rank0 = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.model = load_model(self._dir.name, dtype, rank0, "dummy").model
        if self.driver is None:
            self.lora = LoraSlots(self.model, num_slots=num_slots, max_rank=max_rank)
            self.runner = ModelRunner(self.model, BLOCK_SIZE, rank0)
        else:
            self.lora = self.driver.lora_slots(self.model, num_slots, max_rank)
            self.runner = self.driver.model_runner(self.model, BLOCK_SIZE, rank0, "auto")
        self.max_num_seqs, self.max_model_len, self.max_batched = max_num_seqs, max_model_len, max_batched_tokens
        t1 = time.perf_counter()
        per_block = kv_cache_bytes_per_block(cfg, BLOCK_SIZE, dtype, tp)
        need = max_num_seqs * -(-max_model_len // BLOCK_SIZE)
        budget = self.runner.kv_cache_budget(utilization, max_batched_tokens, max_model_len, max_num_seqs) \
            if cuda else need * per_block  # fmt: skip
        self.num_blocks = min(budget // per_block, need)
        self.runner.allocate_kv_cache(self.num_blocks, dtype)
        t2 = time.perf_counter()
        if cuda:
            self.runner.capture_decode_graphs(min(graph_max_batch, max_num_seqs), max_model_len)
        t3 = time.perf_counter()
        params = sum(p.numel() for p in self.model.parameters())
        self.setup = dict(tensor_parallel_size=tp, build_s=t1 - t0, profile_and_kv_s=t2 - t1,
                          graph_capture_s=t3 - t2, kv_budget_bytes=int(budget), kv_blocks=int(self.num_blocks),
                          params_per_rank=int(params), weight_gib_per_rank=params * dtype.itemsize / 2**30,
                          gpu_mem_allocated=int(torch.cuda.memory_allocated()) if cuda else 0)  # fmt: skip

    def load_adapters(self, num: int, ranks: list[int], targets: tuple[str, ...], seed: int = 1) -> float:
        """Random host adapters into slots 0..num-1, as the server copies them (the workers get theirs too)."""
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        shapes = self.lora.expected_shapes()
        dtype = next(self.model.parameters()).dtype
        for i in range(num):
            rank = ranks[i % len(ranks)]
            modules = {}
            for layer in range(self.cfg.num_hidden_layers):
                for short in targets:
                    d_in, d_out = shapes[short]
                    a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
                    b = torch.randn(d_out, rank, generator=gen) * 0.5 / rank**0.5
                    modules[(layer, short)] = (a.to(dtype), b.to(dtype))
            self.lora.load(i, _Weights(f"adapter-{i}", modules, rank))
        return time.perf_counter() - t0

    def _graph_gpu_ms(self, lora: bool) -> float | None:
        # Replaying a graph on rank 0 alone would wait forever in its all-reduces.
        return None if self.driver is not None else super()._graph_gpu_ms(lora)

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self._dir.cleanup()


class Results:
    """DIR/bench_tp.json, rewritten after every measurement (phases run in separate processes)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "bench_tp.json"

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"phases": {}}

    def record(self, phase: str | None, key: str, value) -> None:
        data = self.load()
        (data["phases"].setdefault(phase, {}) if phase else data)[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {phase or ''}.{key}: {str(value)[:300]}", flush=True)


def run_phase(name: str, out: Path, smoke: bool, device: str, deadline: float) -> None:
    shape, tp, _ = PHASES[name]
    results = Results(out)
    if device == "cpu":  # the offline loop syncs CUDA before reading clocks; a CPU has nothing to wait for
        torch.cuda.synchronize = lambda *args, **kwargs: None
    work = SMOKE_WORKLOAD if smoke else WORKLOAD
    q = TPOffline(model_config(shape, 2 if smoke else None, smoke and device == "cpu"), tp, device, num_slots=8, max_rank=16,
                  max_num_seqs=128, max_model_len=1024 if not smoke else 64,
                  max_batched_tokens=8192 if not smoke else 256, graph_max_batch=128)  # fmt: skip
    try:
        results.record(name, "setup", q.setup)
        requests = make_requests(work["requests"], work["seed"], q.cfg.vocab_size, work["prompt_len"],
                                 work["output_len"])
        q.run([Request(r.prompt, 2, r.slot) for r in requests])  # compiles Triton for these shapes
        limit = max(5.0, deadline - time.time() - 10)
        results.record(name, "base", q.run(requests, limit))
        if deadline - time.time() > 25:
            prompt_len, output_len = (16, 8) if smoke else (128, 96)
            q.single_stream(prompt_len, 4, -1, 1)
            results.record(name, "single_stream", q.single_stream(prompt_len, output_len, -1, repeats=2))
        if deadline - time.time() > 30:
            results.record(name, "adapter_load_s", q.load_adapters(8, [16], QKVO))
            mixed = assign_adapters(requests, 8, 1.0, 1)
            q.run([Request(r.prompt, 2, r.slot) for r in mixed])
            results.record(name, "n8_qkvo_r16", q.run(mixed, max(5.0, deadline - time.time() - 5)))
    finally:
        q.close()


def _environment(device: str) -> dict:
    env = dict(torch=torch.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"), workload=WORKLOAD,
               nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, gpus=torch.cuda.device_count(),
                   device_memory_gib=round(props.total_memory / 2**30, 1),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))  # fmt: skip
    return env


def orchestrate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = Results(out)
    deadline = time.time() + args.budget_s
    from engine.distributed import disable_nvlink_multicast

    disable_nvlink_multicast()  # the phase processes and their workers inherit it
    results.record(None, "environment", _environment(args.device))
    names = args.phases.split(",")
    for i, name in enumerate(names):
        estimates = [20 if args.smoke else PHASES[n][2] for n in names[i:]]
        left = deadline - time.time()
        if left < estimates[0]:
            results.record(name, "skipped", f"{left:.0f} s left, the phase needs ~{estimates[0]} s")
            continue
        # Its share of the time left: its optional measurements stop there, so later phases run too.
        soft = time.time() + left * estimates[0] / sum(estimates)
        cmd = [sys.executable, __file__, "--run-phase", name, "--out", str(out), "--device", args.device,
               "--deadline", str(soft)] + (["--smoke"] if args.smoke else [])  # fmt: skip
        t0 = time.time()
        # Its own process group: on a timeout the phase and the TP worker it spawned go together.
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, min(deadline, soft + 30) - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        results.record(name, "phase", dict(exit=code, seconds=round(time.time() - t0, 1)))
    (out / "bench_tp.md").write_text(render(results.load()))


def render(data: dict) -> str:
    env, phases = data.get("environment", {}), data["phases"]
    lines = [f"# Quiver tensor-parallel offline benchmark — {env.get('gpus', '?')}x {env.get('device', 'CPU')}", "",
             f"torch {env.get('torch')}, NCCL {env.get('nccl', '-')} (NCCL_NVLS_ENABLE={env.get('nccl_nvls_enable')}); "
             f"started {env.get('started')}. Random weights of real shapes, bf16, greedy, forced output lengths, "
             f"decode CUDA graphs. Workload: {WORKLOAD['requests']} requests, prompt / output lengths uniform on "
             f"{list(WORKLOAD['prompt_len'])} / {list(WORKLOAD['output_len'])} (seed 0), all submitted at once; "
             "`n8` runs the same requests spread uniformly over 8 rank-16 q/k/v/o adapters. Raw numbers: the "
             "JSON beside this file.", "",
             "| phase | model | TP | weights GiB/GPU | base tok/s | decode step ms | batch-1 ms/token | n8 adapters tok/s "
             "| status |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (shape, tp, _) in PHASES.items():
        p = phases.get(name, {})
        base, single, mixed, setup = p.get("base", {}), p.get("single_stream", {}), p.get("n8_qkvo_r16", {}), p.get("setup", {})
        status = p.get("skipped") or p.get("phase", {}).get("exit", "not run")
        lines.append(f"| {name} | {shape} | {tp} | {_num(setup.get('weight_gib_per_rank'), 1)} "
                     f"| {_num(base.get('output_tok_s'), 0)} | {_num(base.get('decode_step_ms'), 2)} "
                     f"| {_num(single.get('ms_per_token'), 2)} | {_num(mixed.get('output_tok_s'), 0)} | {status} |")
    t1 = phases.get("llama8b_tp1", {}).get("base", {}).get("output_tok_s")
    t2 = phases.get("llama8b_tp2", {}).get("base", {}).get("output_tok_s")
    s1 = phases.get("llama8b_tp1", {}).get("single_stream", {}).get("ms_per_token")
    s2 = phases.get("llama8b_tp2", {}).get("single_stream", {}).get("ms_per_token")
    lines.append("")
    if t1 and t2:
        lines.append(f"llama-8b TP=2 vs TP=1: throughput {t2 / t1:.2f}x, scaling efficiency {t2 / (2 * t1):.0%} "
                     "(TP=2 tok/s over twice TP=1's)."
                     + (f" Batch-1: {s2:.2f} ms/token at TP=2, {s1:.2f} at TP=1 ({s1 / s2:.2f}x)." if s1 and s2 else ""))
    else:
        lines.append("llama-8b scaling efficiency: not measured (a phase is missing).")
    return "\n".join(lines) + "\n"


def _num(value, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--run-phase")
    parser.add_argument("--deadline", type=float)
    args = parser.parse_args()
    if args.run_phase is None:
        orchestrate(args)
        return
    try:
        run_phase(args.run_phase, Path(args.out), args.smoke, args.device, args.deadline)
    except Exception as exc:
        Results(Path(args.out)).record(args.run_phase, "error", f"{type(exc).__name__}: {exc}\n"
                                                                f"{traceback.format_exc()[-3000:]}")
        raise


if __name__ == "__main__":
    main()
