"""Micro-benchmark of the Triton kernels against the torch references, one layer's shapes.

    python load_tests/kernel_bench.py results.json [--quick]

Times are CUDA events, median of several repetitions, in microseconds per call:
  eager  back-to-back Python launches (what a runner without graphs pays, launch cost included)
  graph  the same calls captured in one CUDA graph and replayed (GPU time; what decode with
         CUDA graphs pays)
Every call of a repetition works on another copy of its inputs (enough copies to outgrow
L2), so the numbers are for data coming from HBM, as in a real forward pass where the base
layers flush L2 between LoRA calls. TB/s counts the bytes the op must move at least once.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import torch_store_kv  # noqa: E402
from engine.context import LoraContext  # noqa: E402
from engine.kernels import triton_attention as tattn  # noqa: E402
from engine.kernels import triton_lora as tlora  # noqa: E402
from engine.kernels.lora_ref import lora_bgmv, lora_shrink_expand_sgmv  # noqa: E402

MODELS = {  # hidden, q heads, kv heads, head dim
    "llama-1b": (2048, 32, 8, 64),
    "llama-8b": (4096, 32, 8, 128),
}
DTYPE = torch.bfloat16
WORKING_SET = 256 << 20  # bytes of input copies to cycle through per repetition


def gpu_time_us(calls, graph: bool, reps: int = 7) -> float:
    """Median microseconds per call over `reps` passes through `calls`."""
    for c in calls:  # warm-up: compile, allocate
        c()
    torch.cuda.synchronize()
    run = lambda: [c() for c in calls]  # noqa: E731
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """TB/s of a large device-to-device copy, bytes read plus written: the memory ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = gpu_time_us([lambda: dst.copy_(src)] * 5, graph=False)
    return 2 * src.numel() / us / 1e6


# ---------------------------------------------------------------- LoRA


def _lora_ctx(batch: int, adapters: int) -> LoraContext:
    """Tokens split evenly over `adapters` slots, sorted by slot (as the model runner orders them)."""
    slots = [i * adapters // batch for i in range(batch)]
    bounds: list[tuple[int, int, int]] = []
    for t, s in enumerate(slots):
        if bounds and bounds[-1][2] == s:
            bounds[-1] = (bounds[-1][0], t + 1, s)
        else:
            bounds.append((t, t + 1, s))
    dev = lambda v: torch.tensor(v, dtype=torch.long, device="cuda")  # noqa: E731
    return LoraContext(
        dev(slots), dev([b[0] for b in bounds] + [batch]), dev([b[2] for b in bounds]), bounds, True
    )


def bench_lora(batch: int, adapters: int, k: int, n: int, rank: int, quick: bool) -> dict:
    ctx = _lora_ctx(batch, adapters)
    used = len(ctx.seg_bounds)
    min_bytes = 2 * (batch * k + used * rank * (k + n) + 2 * batch * n)
    footprint = 2 * (batch * k + adapters * rank * (k + n) + batch * n)
    copies = max(2, min(64 if quick else 256, math.ceil(WORKING_SET / footprint)))
    sets = []
    for _ in range(copies):
        a = torch.randn(adapters, rank, k, device="cuda", dtype=DTYPE) / k**0.5
        b = torch.randn(adapters, n, rank, device="cuda", dtype=DTYPE) * 0.01
        x = torch.randn(batch, k, device="cuda", dtype=DTYPE)
        y = torch.randn(batch, n, device="cuda", dtype=DTYPE)
        sets.append((y, x, a, b))
    ref_sets = sets[: min(copies, 16)]
    res = {"batch": batch, "adapters": adapters, "in": k, "out": n, "rank": rank, "min_bytes": min_bytes}
    res["ref_bgmv_eager_us"] = gpu_time_us(
        [lambda s=s: lora_bgmv(*s, ctx.token_slots, 0) for s in ref_sets], False, 3
    )
    res["ref_sgmv_eager_us"] = gpu_time_us(
        [lambda s=s: lora_shrink_expand_sgmv(*s, ctx.seg_bounds, 0) for s in ref_sets], False, 3
    )
    for name, per_token in (("sgmv", False), ("bgmv", True)):
        calls = [lambda s=s, p=per_token: tlora.lora_apply(*s, ctx, 0, per_token=p) for s in sets]
        res[f"{name}_eager_us"] = gpu_time_us(calls, False)
        res[f"{name}_graph_us"] = gpu_time_us(calls, True)
    res["sgmv_graph_tbs"] = min_bytes / res["sgmv_graph_us"] / 1e6
    # Capture-safe SGMV: segment tensors padded to one run per slot plus base, grid for T tokens.
    padded = _padded(ctx, batch, min(batch, adapters + 1))
    calls = [lambda s=s: tlora.lora_apply(*s, padded, 0) for s in sets]
    res["sgmv_padded_graph_us"] = gpu_time_us(calls, True)
    return res


def _padded(ctx: LoraContext, tokens: int, capacity: int) -> LoraContext:
    n = ctx.seg_slots.numel()
    pad = lambda t, value, length: torch.cat([t, t.new_full((length - t.numel(),), value)])  # noqa: E731
    return LoraContext(
        ctx.token_slots, pad(ctx.seg_starts, tokens, capacity + 1), pad(ctx.seg_slots, -1, max(capacity, n)),
        ctx.seg_bounds, ctx.any_lora,
    )  # fmt: skip


def lora_breakdown(batch: int, adapters: int, k: int, n: int, rank: int) -> dict:
    """Graph µs of shrink and expand alone, across the split / tile-width knobs."""
    ctx = _lora_ctx(batch, adapters)
    copies = 64
    sets = [
        (
            torch.randn(batch, k, device="cuda", dtype=DTYPE),
            torch.randn(adapters, rank, k, device="cuda", dtype=DTYPE),
            torch.randn(adapters, n, rank, device="cuda", dtype=DTYPE),
            torch.randn(batch, n, device="cuda", dtype=DTYPE),
        )
        for _ in range(copies)
    ]
    res = {"batch": batch, "adapters": adapters, "in": k, "out": n}
    args = (ctx.seg_starts, ctx.seg_slots)
    for split in (None, 1, 4, 8, 16, 32):
        calls = [lambda st=st, sp=split: tlora.sgmv_shrink(st[0], st[1], *args, split_k=sp) for st in sets]
        res[f"shrink_split={split}"] = gpu_time_us(calls, True)
    hs = [torch.randn(batch, rank, device="cuda") for _ in range(copies)]
    for block_n in (None, 64, 128, 256):
        calls = [
            lambda st=st, h=h, bn=block_n: tlora.sgmv_expand(h, st[2], *args, st[3], block_n=bn)
            for st, h in zip(sets, hs, strict=True)
        ]
        res[f"expand_block_n={block_n}"] = gpu_time_us(calls, True)
    return res


def bench_lora_prefill(tokens: int, adapters: int, k: int, n: int, rank: int) -> dict:
    """Long segments (prefill): triton SGMV against the reference's per-segment matmuls."""
    ctx = _lora_ctx(tokens, adapters)
    sets = [
        (
            torch.randn(tokens, n, device="cuda", dtype=DTYPE),
            torch.randn(tokens, k, device="cuda", dtype=DTYPE),
            torch.randn(adapters, rank, k, device="cuda", dtype=DTYPE) / k**0.5,
            torch.randn(adapters, n, rank, device="cuda", dtype=DTYPE) * 0.01,
        )
        for _ in range(4)
    ]
    min_bytes = 2 * (tokens * k + adapters * rank * (k + n) + 2 * tokens * n)
    res = {"tokens": tokens, "adapters": adapters, "in": k, "out": n, "rank": rank, "min_bytes": min_bytes}
    res["ref_sgmv_eager_us"] = gpu_time_us(
        [lambda s=s: lora_shrink_expand_sgmv(*s, ctx.seg_bounds, 0) for s in sets], False
    )
    res["sgmv_eager_us"] = gpu_time_us([lambda s=s: tlora.lora_apply(*s, ctx, 0) for s in sets], False)
    res["sgmv_graph_us"] = gpu_time_us([lambda s=s: tlora.lora_apply(*s, ctx, 0) for s in sets], True)
    res["sgmv_graph_tbs"] = min_bytes / res["sgmv_graph_us"] / 1e6
    return res


def launch_overhead() -> dict:
    """Eager µs per call of a one-element Triton kernel and of a one-element torch op (CPU-bound)."""
    x = torch.zeros(1, device="cuda")
    ctx = _lora_ctx(1, 1)
    a = torch.zeros(1, 16, 16, device="cuda", dtype=DTYPE)
    xs = torch.zeros(1, 16, device="cuda", dtype=DTYPE)
    return {
        "torch_add_eager_us": gpu_time_us([lambda: x.add_(1)] * 200, False),
        "triton_shrink_eager_us": gpu_time_us(
            [lambda: tlora.sgmv_shrink(xs, a, ctx.seg_starts, ctx.seg_slots)] * 200, False
        ),
    }


# ---------------------------------------------------------------- attention


def bench_attention(batch: int, ctx_len: int, hq: int, hkv: int, d: int, page: int, sweep: bool) -> dict:
    kv_bytes = 2 * batch * ctx_len * hkv * d * 2
    copies = 2 if kv_bytes >= WORKING_SET else math.ceil(WORKING_SET / kv_bytes)
    per_seq = ctx_len // page
    pool = copies * batch * per_seq
    k_cache = torch.randn(pool, page, hkv, d, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(pool, page, hkv, d, device="cuda", dtype=DTYPE)
    perm = torch.randperm(pool, device="cuda", dtype=torch.int32)
    tables = [
        perm[c * batch * per_seq : (c + 1) * batch * per_seq].view(batch, per_seq) for c in range(copies)
    ]
    lens = torch.full((batch,), ctx_len, dtype=torch.int32, device="cuda")
    qs = [torch.randn(batch, hq, d, device="cuda", dtype=DTYPE) for _ in range(copies)]
    scale = d**-0.5
    res = {
        "batch": batch,
        "ctx_len": ctx_len,
        "hq": hq,
        "hkv": hkv,
        "d": d,
        "page": page,
        "min_bytes": kv_bytes,
    }

    def paged(**kw):
        return [
            lambda q=q, t=t: tattn.paged_decode_attention(
                q, k_cache, v_cache, t, lens, scale, None, ctx_len, **kw
            )
            for q, t in zip(qs, tables, strict=True)
        ]

    ref = _dense_ref(qs[0], k_cache, v_cache, tables[0], scale)
    err = (paged()[0]().float() - ref.float()).norm() / ref.float().norm()
    res["max_rel_err_vs_sdpa"] = err.item()
    res["triton_eager_us"] = gpu_time_us(paged(), False)
    res["triton_graph_us"] = gpu_time_us(paged(), True)
    if sweep and batch * hkv >= 256:
        res["sweep_graph_us"] = {
            f"block_n={bn},warps={w}": gpu_time_us(paged(block_n=bn, num_warps=w), True)
            for bn in (16, 32, 64, 128)
            for w in (4, 8)
            if bn % page == 0
        }
    elif sweep:  # few (sequence, kv head) pairs: how much the split into partitions buys
        res["sweep_graph_us"] = {f"splits={sp}": gpu_time_us(paged(num_splits=sp), True) for sp in (1, 2, 4, 8, 16)}
    # Dense SDPA over the same data laid out contiguously [B, Hkv, L, D] (enable_gqa): the
    # gather-free baseline a paged kernel should approach.
    dense = [
        (q[:, :, None], *(c[t.long()].flatten(1, 2).transpose(1, 2).contiguous() for c in (k_cache, v_cache)))
        for q, t in zip(qs, tables, strict=True)
    ]
    sdpa = [lambda a=a: F.scaled_dot_product_attention(*a, scale=scale, enable_gqa=True) for a in dense]
    res["sdpa_dense_eager_us"] = gpu_time_us(sdpa, False)
    res["sdpa_dense_graph_us"] = gpu_time_us(sdpa, True)
    res["triton_graph_tbs"] = kv_bytes / res["triton_graph_us"] / 1e6
    res["sdpa_dense_graph_tbs"] = kv_bytes / res["sdpa_dense_graph_us"] / 1e6
    return res


def _dense_ref(q, k_cache, v_cache, table, scale):
    k = k_cache[table.long()].flatten(1, 2).transpose(1, 2)
    v = v_cache[table.long()].flatten(1, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]


def bench_store(tokens: int, hkv: int, d: int, page: int) -> dict:
    blocks = 4096
    kc = torch.zeros(blocks, page, hkv, d, device="cuda", dtype=DTYPE)
    vc = torch.zeros_like(kc)
    sets = []
    for _ in range(32):
        kv = torch.randn(2, tokens, hkv, d, device="cuda", dtype=DTYPE)
        sets.append((kv[0], kv[1], torch.randperm(blocks * page, device="cuda")[:tokens]))
    res = {"tokens": tokens, "hkv": hkv, "d": d, "min_bytes": 4 * tokens * hkv * d * 2}
    for name, fn in (("triton", tattn.store_kv), ("index_copy", torch_store_kv)):
        calls = [lambda s=s, f=fn: f(s[0], s[1], kc, vc, s[2]) for s in sets]
        res[f"{name}_eager_us"] = gpu_time_us(calls, False)
        res[f"{name}_graph_us"] = gpu_time_us(calls, True)
    return res


# ---------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; copy ceiling {report['copy_tbs']:.2f} TB/s (read + write).", ""]
    lines += [
        "LoRA rank 16, one layer's q+k+v+o (sum of the four calls), decode, bf16. µs per layer:",
        "",
        "| model | batch | adapters | ref bgmv (eager) | ref sgmv (eager) | triton sgmv eager | triton sgmv graph "
        "| sgmv TB/s (graph) | triton sgmv graph, padded | triton bgmv graph |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in report["lora"]:
        groups.setdefault((r["model"], r["batch"], r["adapters"]), []).append(r)
    for (model, batch, adapters), rs in groups.items():
        tot = {key: sum(r[key] for r in rs) for key in rs[0] if key.endswith("_us")}
        tbs = sum(r["min_bytes"] for r in rs) / tot["sgmv_graph_us"] / 1e6
        lines.append(
            f"| {model} | {batch} | {adapters} | {tot['ref_bgmv_eager_us']:.1f} | {tot['ref_sgmv_eager_us']:.1f} "
            f"| {tot['sgmv_eager_us']:.1f} | {tot['sgmv_graph_us']:.1f} | {tbs:.2f} | {tot['sgmv_padded_graph_us']:.1f} "
            f"| {tot['bgmv_graph_us']:.1f} |"
        )
    lines += ["", "LoRA prefill (llama-8b q shape, rank 16), µs per call:", "",
              "| tokens | adapters | ref sgmv eager | triton eager | triton graph | TB/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.get("lora_prefill", []):
        lines.append(
            f"| {r['tokens']} | {r['adapters']} | {r['ref_sgmv_eager_us']:.1f} | {r['sgmv_eager_us']:.1f} "
            f"| {r['sgmv_graph_us']:.1f} | {r['sgmv_graph_tbs']:.2f} |"
        )
    lines += [
        "",
        "Paged decode attention, bf16, µs per call (KV bytes / time = TB/s):",
        "",
        "| model | B | L | page | triton eager | triton graph | TB/s | SDPA dense graph | TB/s | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["attention"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ctx_len']} | {r['page']} | {r['triton_eager_us']:.1f} "
            f"| {r['triton_graph_us']:.1f} | {r['triton_graph_tbs']:.2f} | {r['sdpa_dense_graph_us']:.1f} "
            f"| {r['sdpa_dense_graph_tbs']:.2f} | {r['max_rel_err_vs_sdpa']:.1e} |"
        )
    lines += ["", "store_kv (K and V of T tokens), µs per call:", "", "| T | triton eager | triton graph "
              "| index_copy_ eager | index_copy_ graph |", "|---|---|---|---|---|"]  # fmt: skip
    for r in report["store_kv"]:
        lines.append(
            f"| {r['tokens']} | {r['triton_eager_us']:.1f} | {r['triton_graph_us']:.1f} "
            f"| {r['index_copy_eager_us']:.1f} | {r['index_copy_graph_us']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="fewer cases and copies (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_tbs": copy_bandwidth(),
    }
    save = lambda: args.out.write_text(json.dumps(report, indent=1))  # noqa: E731
    report["lora"] = []
    for model, (hidden, hq, hkv, d) in MODELS.items():
        shapes = {
            "q": (hidden, hq * d),
            "k": (hidden, hkv * d),
            "v": (hidden, hkv * d),
            "o": (hq * d, hidden),
        }
        for batch in (64,) if args.quick else (64, 256):
            for adapters in (1, 32) if args.quick else (1, 8, 32, 128):
                for proj, (k, n) in shapes.items():
                    r = bench_lora(batch, adapters, k, n, 16, args.quick)
                    report["lora"].append({"model": model, "proj": proj, **r})
                    print(
                        f"lora {model} {proj} B={batch} A={adapters}: sgmv {r['sgmv_graph_us']:.1f} us",
                        flush=True,
                    )
    save()
    report["launch"] = launch_overhead()
    report["lora_breakdown"] = [
        lora_breakdown(64, 1, 4096, 4096, 16),
        lora_breakdown(256, 128, 4096, 4096, 16),
        lora_breakdown(64, 32, 2048, 512, 16),
    ]
    report["lora_prefill"] = [
        bench_lora_prefill(t, a, 4096, 4096, 16) for t, a in ((2048, 4), (2048, 64), (8192, 8))
    ]
    save()
    report["attention"] = []
    cases = [(m, b, 512, 16) for m in MODELS for b in (64, 256)]
    cases += [("llama-8b", 64, 512, 32), ("llama-8b", 8, 4096, 16), ("llama-8b", 64, 4096, 16)]
    for model, batch, ctx_len, page in cases[:1] if args.quick else cases:
        _, hq, hkv, d = MODELS[model]
        r = bench_attention(
            batch, ctx_len, hq, hkv, d, page, sweep=batch <= 64 and ctx_len == 512 or batch == 8
        )
        report["attention"].append({"model": model, **r})
        print(f"attn {model} B={batch} L={ctx_len}: {r['triton_graph_us']:.1f} us", flush=True)
        save()
    report["store_kv"] = [bench_store(t, 8, 128, 16) for t in (64, 256)]
    save()
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
