"""Batch-1 projections of the llama-8b shape: cuBLAS against the engine's Triton GEMV.

At batch 1 the decode step is ~90% matmul, and cuBLAS's batch-1 kernels read the weights at
1.7-2.9 TB/s. Two measurements, both under CUDA graphs, GPU only:

- `sweep`: each projection alone, `x @ W.T` through torch and through
  `engine.kernels.triton_gemv.linear` over a grid of tile shapes. Every call reads a different
  copy of W (4 copies), so no call finds its weights in L2.
- `chain`: the matmuls and elementwise kernels of a whole batch-1 decode step (32 layers of
  distinct weights, then the LM head), once with cuBLAS, once with the GEMV, and once with
  the GEMV and programmatic dependent launch (engine/kernels/pdl.py), which lets each kernel
  read its weights while the one before it finishes. This is the figure that says what the
  engine can gain: kernel boundaries, not just each kernel's own speed.

    python load_tests/gemv_bench.py --out DIR [--parts sweep,chain]     # DIR/gemv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels import pdl, triton_fused, triton_gemv  # noqa: E402
from load_tests.gpu_timing import replay_ms  # noqa: E402
from load_tests.kernel_bench import gpu_time_us  # noqa: E402

# (name, out_features N, in_features K) of llama-8b; qkv and gate_up are the fused projections.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]  # fmt: skip
CONFIGS = [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]
LAYERS = 32
COPIES = 4


def sweep_shape(n: int, k: int) -> dict:
    """torch and every tile shape on [n, k] bf16 weights; GPU µs per call, PDL off."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = (x @ ws[0].T).float()
    gb = n * k * 2 / 1e9
    entry = {"weight_gb": gb, "torch_us": gpu_time_us([lambda w=w: x @ w.T for w in ws], graph=True, reps=30),
             "triton": []}  # fmt: skip
    for cfg in CONFIGS:
        try:
            y = triton_gemv.linear(x, ws[0], config=cfg, use_pdl=False).float()
        except Exception as exc:  # a tile shape the compiler refuses (registers): skip it
            entry["triton"].append({"config": cfg, "error": str(exc)[:200]})
            continue
        err = ((y - ref).norm() / ref.norm()).item()
        us = gpu_time_us([lambda w=w, c=cfg: triton_gemv.linear(x, w, config=c, use_pdl=False) for w in ws],
                         graph=True, reps=30)  # fmt: skip
        entry["triton"].append({"config": cfg, "us": us, "rel_err": err})
    ok = [e for e in entry["triton"] if "us" in e]
    best = min(ok, key=lambda e: e["us"])
    entry.update(best=best, torch_tb_s=gb / entry["torch_us"] * 1e3, best_tb_s=gb / best["us"] * 1e3)
    del ws
    torch.cuda.empty_cache()
    return entry


class Chain:
    """A batch-1 decode step's weights (32 distinct layers + LM head) and its kernel sequence."""

    def __init__(self, configs: dict[str, tuple[int, int, int]] | None) -> None:
        self.w = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
                  for name, n, k in SHAPES if name != "lm_head"}  # fmt: skip
        self.lm_head = torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        self.norm_w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
        self.x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        self.configs = configs or {}
        self.gb = (sum(w.numel() for ws in self.w.values() for w in ws) + self.lm_head.numel()) * 2 / 1e9

    def step(self, mode: str) -> torch.Tensor:
        def mm(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
            if mode == "cublas":
                return x @ w.T
            return triton_gemv.linear(x, w, config=self.configs.get(name))

        hidden, residual = self.x, self.x
        for i in range(LAYERS):
            h, residual = triton_fused.add_rms_norm(hidden, residual, self.norm_w, 1e-5)
            qkv = mm(h, self.w["qkv"][i], "qkv")
            attn = qkv[:, :4096].contiguous()  # stands in for rotary + attention (a small copy)
            o = mm(attn, self.w["o"][i], "o")
            h, residual = triton_fused.add_rms_norm(o, residual, self.norm_w, 1e-5)
            act = triton_fused.silu_and_mul(mm(h, self.w["gate_up"][i], "gate_up"))
            hidden = mm(act, self.w["down"][i], "down")
        h, _ = triton_fused.add_rms_norm(hidden, residual, self.norm_w, 1e-5)
        return mm(h, self.lm_head, "lm_head")

    def time_ms(self, mode: str, reps: int = 10) -> tuple[float, torch.Tensor]:
        pdl.set_enabled(mode == "gemv_pdl")
        try:
            out = self.step(mode)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.step(mode)
            graph.replay()
            torch.cuda.synchronize()
            return replay_ms(graph, reps), out.float().clone()
        finally:
            pdl.set_enabled(True)


def run_chain(configs: dict[str, tuple[int, int, int]]) -> dict:
    chain = Chain(configs)
    result: dict = {"weight_gb": chain.gb, "layers": LAYERS}
    ref = None
    for mode in ("cublas", "gemv", "gemv_pdl"):
        ms, out = chain.time_ms(mode)
        if ref is None:
            ref = out
        err = ((out - ref).norm() / ref.norm()).item()
        result[mode] = {"ms": ms, "tb_s": chain.gb / ms, "rel_err_vs_cublas": err}
        print(f"chain {mode:9s} {ms:7.3f} ms  {chain.gb / ms:.2f} TB/s  rel err {err:.2e}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="sweep,chain")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    configs: dict[str, tuple[int, int, int]] = {}
    if "sweep" in parts:
        for name, n, k in SHAPES:
            entry = results["shapes"][name] = sweep_shape(n, k)
            best = entry["best"]
            configs[name] = tuple(best["config"])
            print(f"{name:8s} {entry['weight_gb'] * 1e3:8.1f} MB  torch {entry['torch_us']:8.1f} us "
                  f"({entry['torch_tb_s']:.2f} TB/s)  triton {best['us']:8.1f} us ({entry['best_tb_s']:.2f} TB/s) "
                  f"{best['config']}", flush=True)  # fmt: skip
        results["best_configs"] = configs
    if "chain" in parts:
        results["chain"] = run_chain(configs)
    (args.out / "gemv.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
