"""Render `load_tests/bench.py`'s JSON as a markdown table and an adapter-sweep plot.

    python load_tests/bench_report.py load_tests/results/bench-h100.json   # writes .md and .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _tok_s(entry: dict) -> str:
    return f"{entry['output_tok_s']:,.0f}"


def render(data: dict) -> str:
    p = data["phases"]
    q, base_run = p.get("quiver_1b", {}), p.get("quiver_1b", {}).get("base")
    hf = p.get("baselines", {})
    w = data["workload"]
    lines = [
        f"# Quiver offline benchmark — {data['device']}",
        "",
        f"torch {data.get('torch')}, transformers {data.get('transformers')}, triton {data.get('triton')}; "
        f"started {data['started']}. Random-weight models of real shapes, bf16, greedy, forced output "
        f"lengths. Offline workload: {w['requests']} requests, prompt and output lengths uniform on "
        f"{w['prompt_len']} / {w['output_len']} (seed {w['seed']}), all submitted at once. "
        "Ratios are taken within this one run. Raw numbers: the JSON beside this file.",
        "",
        "## Targets",
        "",
        "| # | target | measured | ratio | met |",
        "|---|---|---|---|---|",
    ]
    if base_run and "hf_continuous_batching" in hf and "base_cb_workload" in q:
        cb, ours = hf["hf_continuous_batching"], q["base_cb_workload"]
        r = ours["output_tok_s"] / cb["output_tok_s"]
        impl = cb["attn_implementation"].replace("|", "\\|")  # a pipe would split the table cell
        lines.append(
            f"| 1 | llama-1b base ≥ 6× transformers `generate_batch` ({impl}) | "
            f"Quiver {_tok_s(ours)} vs {_tok_s(cb)} tok/s (same 256 prompts, {cb['max_new_tokens']} "
            f"new tokens each) | {r:.1f}× | {'yes' if r >= 6 else 'no'} |"
        )
    for n, goal in ((128, 0.85), (512, 0.75)):
        run = q.get(f"n{n}_alpha1.0")
        if base_run and isinstance(run, dict):
            r = run["output_tok_s"] / base_run["output_tok_s"]
            lines.append(
                f"| 2 | {n} rank-16 qkvo adapters, uniform ≥ {goal}× base | {_tok_s(run)} vs "
                f"{_tok_s(base_run)} tok/s | {r:.3f}× | {'yes' if r >= goal else 'no'} |"
            )
    if "peft" in hf and isinstance(q.get("n32_alpha1.0"), dict):
        peft = hf["peft"]["mixed"]
        ours = q["n32_alpha1.0"]
        same = q.get("peft_workload")
        r = ours["output_tok_s"] / peft["output_tok_s"]
        extra = ""
        if same:
            extra = (f"; on PEFT's own 32 requests x {hf['peft']['max_new_tokens']} tokens Quiver does "
                     f"{_tok_s(same)} tok/s = {same['output_tok_s'] / peft['output_tok_s']:.0f}×")
        lines.append(
            f"| 3 | ≥ 20× PEFT mixed batches, 32 adapters | Quiver offline N=32 {_tok_s(ours)} vs PEFT "
            f"batch-32 {_tok_s(peft)} tok/s{extra} | {r:.0f}× | {'yes' if r >= 20 else 'no'} |"
        )
    s8 = p.get("quiver_8b", {})
    if "base" in s8:
        b = s8["base"]
        lines.append(
            f"| 4a | llama-8b batch 1 ≤ 1.25× decode floor ({b['floor_ms']} ms) | {b['ms_per_token']:.2f} ms/token "
            f"(GPU replay {b['graph_replay_gpu_ms']:.2f} ms) | {b['vs_floor']:.2f}× | "
            f"{'yes' if b['vs_floor'] <= 1.25 else 'no'} |"
        )
    if "one_adapter" in s8:
        o = s8["one_adapter"]
        lines.append(
            f"| 4b | one adapter ≤ +10% | {o['ms_per_token']:.2f} ms/token | {o['vs_base']:.3f}× | "
            f"{'yes' if o['vs_base'] <= 1.10 else 'no'} |"
        )
    lines += ["", "## Adapter sweep (llama-1b, offline workload)", "",
              "| engine | adapters N | popularity | output tok/s | vs base | decode step ms |",
              "|---|---|---|---|---|---|"]
    for phase, label in (("quiver_1b", "rank 16, q/k/v/o, 512 slots"),
                         ("quiver_1b_mixed", "all linear, ranks {8,16,32,64}, 128 slots")):
        runs = p.get(phase, {})
        base = runs.get("base")
        if not base:
            continue
        lines.append(f"| {label} | 0 (base) | – | {_tok_s(base)} | 1.000 | {base['decode_step_ms']:.2f} |")
        for key, run in runs.items():
            if key.startswith("n") and isinstance(run, dict) and "output_tok_s" in run:
                n, alpha = key[1:].split("_alpha")
                pop = "uniform" if alpha == "1.0" else f"power({alpha})"
                lines.append(f"| {label} | {n} | {pop} | {_tok_s(run)} | "
                             f"{run['output_tok_s'] / base['output_tok_s']:.3f} | {run['decode_step_ms']:.2f} |")
    eager = p.get("quiver_1b_eager", {}).get("base")
    if eager and base_run:
        lines += ["", f"Without CUDA graphs (enforce_eager) the base run does {_tok_s(eager)} tok/s "
                  f"(decode step {eager['decode_step_ms']:.1f} ms): graphs give "
                  f"{base_run['output_tok_s'] / eager['output_tok_s']:.1f}×."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for phase, label in (("quiver_1b", "rank 16 q/k/v/o"), ("quiver_1b_mixed", "all linear, mixed ranks")):
        runs = data["phases"].get(phase, {})
        base = runs.get("base")
        if not base:
            continue
        for alpha, style in (("1.0", "-o"), ("0.3", "--s")):
            pts = sorted((int(k[1:].split("_alpha")[0]), v["output_tok_s"] / base["output_tok_s"])
                         for k, v in runs.items()
                         if k.startswith("n") and k.endswith(f"_alpha{alpha}") and isinstance(v, dict))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style,
                        label=f"{label}, {'uniform' if alpha == '1.0' else 'alpha 0.3'}")
    ax.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax.axhline(0.75, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters N")
    ax.set_ylabel("throughput / base-only")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"llama-1b offline, {data['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    src.with_suffix(".md").write_text(render(data))
    plot(data, src.with_suffix(".png"))


if __name__ == "__main__":
    main()
