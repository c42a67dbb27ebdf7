"""Quiver's GPU benchmark: offline throughput, adapter sweep, single stream, and the baselines.

    python load_tests/bench.py --out DIR [--smoke] [--budget-s 540] [--phases a,b] [--profile]

Random-weight models of real shapes (llama-1b, llama-8b) built on the GPU; forced output
lengths. Phases run in priority order, each skipped when the time budget left is below its
estimate; results are rewritten to DIR/bench.json after every measurement, so a run that is
cut short still leaves its numbers. `--smoke` runs every code path on 2-layer models and a
tiny workload. Imports only engine/scheduler (and transformers/peft for the baselines).
See load_tests/results/NOTES.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.bench_quiver import (  # noqa: E402
    ALL_LINEAR,
    QKVO,
    QuiverOffline,
    Request,
    assign_adapters,
    hf_config,
    make_requests,
)

FLOOR_MS = {"llama-1b": 0.74, "llama-8b": 4.48}


def _warm(q: QuiverOffline, requests: list[Request]) -> None:
    """The same prefill shapes and adapter layout with 2 output tokens: Triton compiles (per
    segment count and tile shape) happen here, not in the timed run."""
    q.run([Request(r.prompt, 2, r.slot) for r in requests])


class Bench:
    def __init__(self, out: Path, budget_s: float, smoke: bool, profile: bool = False) -> None:
        self.out, self.smoke, self.profile = out, smoke, profile
        self.deadline = time.perf_counter() + budget_s
        props = torch.cuda.get_device_properties(0)
        self.results: dict = dict(
            device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
            torch=torch.__version__, smoke=smoke, started=time.strftime("%Y-%m-%d %H:%M:%S"), phases={},
        )  # fmt: skip
        try:
            import transformers
            import triton

            self.results.update(transformers=transformers.__version__, triton=triton.__version__)
        except ImportError:
            pass
        self.layers = 2 if smoke else None
        n = 16 if smoke else 256
        lo, hi = (16, 64) if smoke else (100, 1024)
        self.requests = make_requests(n, 0, 128256, (lo, hi), (lo, hi))
        self.results["workload"] = dict(requests=n, prompt_len=[lo, hi], output_len=[lo, hi], seed=0)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench.json").write_text(json.dumps(self.results, indent=1))

    def record(self, phase: str, key: str, value) -> None:
        self.results["phases"].setdefault(phase, {})[key] = value
        self.save()
        print(f"[{time.strftime('%H:%M:%S')}] {phase}.{key}: {_short(value)}", flush=True)

    def phase(self, name: str, estimate_s: float, fn) -> None:
        if self.left() < estimate_s:
            self.record(name, "skipped", f"{self.left():.0f} s left, phase needs ~{estimate_s:.0f} s")
            return
        t0 = time.perf_counter()
        try:
            fn(name)
        except Exception as exc:  # noqa: BLE001 - a failed phase must not lose the others
            self.record(name, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        self.record(name, "phase_seconds", round(time.perf_counter() - t0, 1))

    # ------------------------------------------------------------------ phases
    def baselines(self, name: str) -> None:
        from load_tests.bench_baselines import continuous_batching, hf_model, peft_mixed

        model = hf_model(hf_config("llama-1b", self.layers))
        cb_new = 8 if self.smoke else 128
        prompts = [r.prompt for r in self.requests]
        self.record(name, "hf_continuous_batching", continuous_batching(model, prompts, cb_new) | {"max_new_tokens": cb_new})
        peft_new = 4 if self.smoke else 16
        n_adapters = 8 if self.smoke else 32
        self.record(name, "peft", peft_mixed(model, prompts[:n_adapters], n_adapters, peft_new)
                    | {"max_new_tokens": peft_new})
        del model

    def quiver_1b(self, name: str) -> None:
        slots = 16 if self.smoke else 512
        q = QuiverOffline(hf_config("llama-1b", self.layers), num_slots=slots, max_rank=16, max_num_seqs=256,
                          max_model_len=2048, max_batched_tokens=16384, graph_max_batch=256)
        self.record(name, "setup", q.setup)
        self.record(name, "adapter_load_s", q.load_adapters(slots, [16], QKVO))
        warm = make_requests(32, 9, 128256, (100, 1024), (2, 4))
        q.run(assign_adapters(warm, slots, 1.0, 9))
        q.run(warm)
        from engine.kernels.cuda_attention import prefill_path

        self.record(name, "prefill_path", prefill_path())
        limit = 60.0
        cb_new = 8 if self.smoke else 128
        cb_requests = [Request(r.prompt, cb_new) for r in self.requests]
        _warm(q, cb_requests)
        self.record(name, "base_cb_workload", q.run(cb_requests, limit) | {"max_new_tokens": cb_new})
        # Base and every adapter mix, in turn, `rounds` times: each figure is the median of its
        # runs, so host-speed drift during the phase hits them all alike (ratios are what count).
        sweep = [1, 8, 32, 128, 512] if not self.smoke else [1, 8, 16]
        # (requests, one step in flight): "sync_base" is the base run one step at a time.
        runs: dict[str, tuple[list[Request], bool]] = {"base": (self.requests, True),
                                                       "sync_base": (self.requests, False)}
        for alpha in (1.0, 0.3):
            for n in sweep:
                if alpha == 1.0 or n in (32, 512, 16):
                    runs[f"n{n}_alpha{alpha}"] = (assign_adapters(self.requests, n, alpha, 1 + n), True)
        for reqs, _ in runs.values():
            _warm(q, reqs)
        samples: dict[str, list[dict]] = {label: [] for label in runs}
        for _ in range(1 if self.smoke else 3):
            for label, (reqs, overlap) in runs.items():
                if self.left() < 25:
                    break
                samples[label].append(q.run(reqs, limit, overlap=overlap))
        for label, got in samples.items():
            if not got:
                self.record(name, label, "skipped: time budget")
                continue
            median = sorted(got, key=lambda r: r["output_tok_s"])[len(got) // 2]
            self.record(name, label, median | {"runs_tok_s": [round(r["output_tok_s"]) for r in got]})
        n_peft, peft_new = (8, 4) if self.smoke else (32, 16)
        peft_reqs = [Request(r.prompt, peft_new, i % n_peft) for i, r in enumerate(self.requests[:n_peft])]
        _warm(q, peft_reqs)
        self.record(name, "peft_workload", q.run(peft_reqs, limit))
        q.close()

    def quiver_8b(self, name: str) -> None:
        q = QuiverOffline(hf_config("llama-8b", self.layers), num_slots=2, max_rank=16, max_num_seqs=1,
                          max_model_len=512, max_batched_tokens=512, graph_max_batch=1)
        self.record(name, "setup", q.setup)
        q.load_adapters(1, [16], QKVO)
        q.single_stream(128, 8, -1, 1)
        q.single_stream(128, 8, 0, 1)
        out = 32 if self.smoke else 256
        base = q.single_stream(128, out, -1)
        self.record(name, "base", base | {"floor_ms": FLOOR_MS["llama-8b"],
                                          "vs_floor": base["ms_per_token"] / FLOOR_MS["llama-8b"]})
        one = q.single_stream(128, out, 0)
        self.record(name, "one_adapter", one | {"vs_base": one["ms_per_token"] / base["ms_per_token"]})
        if self.profile:
            for lora in (False, True):
                summary = q.profile_graph(lora)
                if summary is not None:
                    label = "lora" if lora else "base"
                    (self.out / f"profile-{name}-{label}.txt").write_text(summary.pop("table"))
                    self.record(name, f"profile_{label}", summary)
        q.close()

    def quiver_8b_unfused(self, name: str) -> None:
        """`quiver_8b` with the torch reference for the elementwise steps (no fused kernels):
        the before/after of engine/kernels/triton_fused.py within one run."""
        from engine.models.layers import set_fused_elementwise

        set_fused_elementwise(False)
        try:
            self.quiver_8b(name)
        finally:
            set_fused_elementwise(True)

    def quiver_8b_cublas(self, name: str) -> None:
        """`quiver_8b` with every matmul on cuBLAS and no programmatic dependent launch: the
        before/after of engine/kernels/triton_gemv.py and engine/kernels/pdl.py within one run."""
        from engine.kernels import pdl
        from engine.models.layers import set_gemv

        set_gemv(False)
        pdl.set_enabled(False)
        try:
            self.quiver_8b(name)
        finally:
            set_gemv(True)
            pdl.set_enabled(True)

    def quiver_1b_nopdl(self, name: str) -> None:
        """`quiver_1b` without programmatic dependent launch (engine/kernels/pdl.py): its
        before/after at large batch, where the matmuls stay on cuBLAS."""
        from engine.kernels import pdl

        pdl.set_enabled(False)
        try:
            self.quiver_1b(name)
        finally:
            pdl.set_enabled(True)

    def quiver_1b_mixed(self, name: str) -> None:
        slots = 16 if self.smoke else 128
        q = QuiverOffline(hf_config("llama-1b", self.layers), num_slots=slots, max_rank=64, max_num_seqs=256,
                          max_model_len=2048, max_batched_tokens=16384, graph_max_batch=256)
        self.record(name, "setup", q.setup)
        q.load_adapters(slots, [8, 16, 32, 64], ALL_LINEAR)
        warm = make_requests(32, 9, 128256, (100, 1024), (2, 4))
        q.run(assign_adapters(warm, slots, 1.0, 9))
        q.run(warm)
        _warm(q, self.requests)
        self.record(name, "base", q.run(self.requests, 60.0))
        for n in ([8, 16] if self.smoke else [32, 128]):
            if self.left() < 30:
                break
            reqs = assign_adapters(self.requests, n, 1.0, 1 + n)
            _warm(q, reqs)
            self.record(name, f"n{n}_alpha1.0", q.run(reqs, 60.0))
        q.close()

    def quiver_1b_eager(self, name: str) -> None:
        """The base run without CUDA graphs: what graphs buy."""
        q = QuiverOffline(hf_config("llama-1b", self.layers), num_slots=1, max_rank=16, max_num_seqs=256,
                          max_model_len=2048, max_batched_tokens=16384, graph_max_batch=256, enforce_eager=True)
        self.record(name, "setup", q.setup)
        _warm(q, self.requests)
        self.record(name, "base", q.run(self.requests, 60.0))
        q.close()


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) < 400 else text[:400] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--phases", default="quiver_1b,baselines,quiver_8b,quiver_1b_mixed,quiver_1b_eager",
                        help="comma-separated; single stream alone: quiver_8b (before/after the fused "
                             "elementwise kernels: quiver_8b_unfused,quiver_8b; before/after "
                             "the GEMV and PDL: quiver_8b_cublas,quiver_8b)")
    parser.add_argument("--profile", action="store_true",
                        help="single-stream phases also write a kernel summary of one graph replay")
    args = parser.parse_args()
    bench = Bench(args.out, args.budget_s, args.smoke, args.profile)
    estimates = {"quiver_1b": 240, "baselines": 60, "quiver_8b": 45, "quiver_8b_unfused": 45, "quiver_8b_cublas": 45, "quiver_1b_nopdl": 120,
                 "quiver_1b_mixed": 50, "quiver_1b_eager": 75}
    if args.smoke:
        estimates = dict.fromkeys(estimates, 5)
    for phase in args.phases.split(","):
        bench.phase(phase, estimates[phase], getattr(bench, phase))
    bench.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    bench.save()


if __name__ == "__main__":
    main()
