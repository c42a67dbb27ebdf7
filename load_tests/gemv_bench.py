"""Batch-1 projections of the llama-8b shape: cuBLAS (torch) against a plain Triton GEMV.

A measurement, not a kernel the engine uses: at batch 1 the step is ~90% matmul, and cuBLAS's
batch-1 kernels read the weights at 2.4-2.9 TB/s (load_tests/results/NOTES.md). This times, for
each projection, `x @ W.T` through torch and through a one-pass Triton GEMV (each program owns
BLOCK_N output rows and streams their K columns once, float32 accumulation) over a small grid
of tile shapes, and reports the weight-read bandwidth of each, so the gain a hand GEMV could
bring is known before one is wired in.

    python load_tests/gemv_bench.py --out DIR      # DIR/gemv.json; GPU only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.kernel_bench import gpu_time_us  # noqa: E402

# (name, out_features N, in_features K) of llama-8b; qkv and gate_up are the fused projections.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]  # fmt: skip
CONFIGS = [(bn, bk, w) for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8)]


@triton.jit
def _gemv_kernel(w_ptr, x_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask_k = cols < K
        x = tl.load(x_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv(w: torch.Tensor, x: torch.Tensor, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    """y [N] = w [N, K] @ x [K]."""
    n, k = w.shape
    y = torch.empty(n, device=w.device, dtype=w.dtype)
    _gemv_kernel[(triton.cdiv(n, block_n),)](w, x, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=num_warps)  # fmt: skip
    return y


def measure(n: int, k: int) -> dict:
    """torch and every Triton tile shape on one [n, k] bf16 weight; GPU times in microseconds."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = (x @ w.T).float().squeeze(0)
    gb = w.numel() * w.element_size() / 1e9
    entry = {"weight_gb": gb, "torch_us": gpu_time_us([lambda: x @ w.T], graph=True, reps=50), "triton": []}
    for bn, bk, warps in CONFIGS:
        y = gemv(w, x[0], bn, bk, warps)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        us = gpu_time_us([lambda bn=bn, bk=bk, warps=warps: gemv(w, x[0], bn, bk, warps)], graph=True, reps=50)
        entry["triton"].append({"block_n": bn, "block_k": bk, "warps": warps, "us": us, "rel_err": err})
    best = min(entry["triton"], key=lambda e: e["us"])
    entry.update(best=best, torch_tb_s=gb / entry["torch_us"] * 1e3, best_tb_s=gb / best["us"] * 1e3)
    return entry


def run() -> dict:
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    for name, n, k in SHAPES:
        entry = results["shapes"][name] = measure(n, k)
        best = entry["best"]
        print(f"{name:8s} {entry['weight_gb'] * 1e3:8.1f} MB  torch {entry['torch_us']:8.1f} us "
              f"({entry['torch_tb_s']:.2f} TB/s)  triton {best['us']:8.1f} us ({entry['best_tb_s']:.2f} TB/s) {best}",
              flush=True)  # fmt: skip
    layers = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
    for key in ("torch_us", "best_triton_us"):
        total = sum(
            layers[s] * (e["torch_us"] if key == "torch_us" else e["best"]["us"]) for s, e in results["shapes"].items()
        )
        results[f"per_token_{key}"] = total
    print(f"per token: torch {results['per_token_torch_us'] / 1e3:.3f} ms, "
          f"best triton {results['per_token_best_triton_us'] / 1e3:.3f} ms", flush=True)  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv.json").write_text(json.dumps(run(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
