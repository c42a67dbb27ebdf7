"""Statistics over request records, the JSON report, a markdown table and PNG plots.

Latencies are reported in milliseconds. SLO attainment counts every request that was sent:
a failed or cancelled request misses its SLO.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.client import RequestRecord, run_duration

PERCENTILES = (50, 90, 99)


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 in ms; None everywhere when there are no values."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(records: Sequence[RequestRecord], *, offered_rate: float, slo_ttft_s: float,
              slo_tpot_s: float | None = None) -> dict[str, Any]:
    sent = [r for r in records if r.sent is not None]
    ok = [r for r in sent if r.ok]
    duration = run_duration(records)
    output_tokens = sum(r.num_output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or r.planned_prompt_len for r in ok)

    def meets_slo(r: RequestRecord) -> bool:
        if not r.ok or r.ttft is None or r.ttft >= slo_ttft_s:
            return False
        return slo_tpot_s is None or r.tpot is None or r.tpot < slo_tpot_s

    adapters = Counter(r.adapter for r in sent if r.adapter is not None)
    send_times = sorted(r.sent for r in sent if r.sent is not None)
    span = send_times[-1] - send_times[0] if len(send_times) > 1 else 0.0
    latencies = [r.latency for r in ok if r.latency is not None]
    # The last completion trails the last arrival by at least one latency even when the server
    # keeps up; discounting the shortest latency keeps short points from looking saturated, while a
    # growing queue (latencies far above the shortest) still shows.
    window = max(span, duration - min(latencies)) if latencies else duration
    return {
        "offered_rate": None if math.isinf(offered_rate) else offered_rate,
        "sustained_rate": len(ok) / window if window > 0 else None,
        "arrival_rate": (len(send_times) - 1) / span if span > 0 else None,
        "num_planned": len(records),
        "num_sent": len(sent),
        "num_ok": len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "input_throughput": prompt_tokens / duration if duration else 0.0,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itls]),
        "e2e_ms": distribution([r.latency for r in ok if r.latency is not None]),
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s,
                "attainment": sum(meets_slo(r) for r in sent) / len(sent) if sent else None},
        "errors": dict(Counter(r.error_type for r in records if r.error_type is not None)),
        "distinct_adapters": len(adapters),
        "top_adapter_share": adapters.most_common(1)[0][1] / sum(adapters.values()) if adapters else None,
        "base_requests": sum(r.adapter is None for r in sent),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(points: Sequence[dict[str, Any]]) -> str:
    """One row per load point of one or more series (each point carries its series label)."""
    head = ("| series | offered (arrived) req/s | completed req/s | output tok/s | TTFT p50 / p99 ms | "
            "TPOT p50 / p99 ms | ITL p50 / p99 ms | SLO | errors | GPU adapter loads / evictions |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        offered = "max" if p["offered_rate"] is None else fmt(p["offered_rate"], 2)
        if p["offered_rate"] is not None and p.get("arrival_rate") is not None:
            offered += f" ({p['arrival_rate']:.2f})"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
        slo = p["slo"]["attainment"]
        loads = p.get("server", {}).get("adapter_gpu_loads")
        evictions = p.get("server", {}).get("adapter_gpu_evictions")
        lines.append(
            f"| {p.get('series', '')} | {offered} | {fmt(p['request_throughput'], 2)} | "
            f"{fmt(p['output_throughput'])} | {fmt(p['ttft_ms']['p50'], 0)} / {fmt(p['ttft_ms']['p99'], 0)} | "
            f"{fmt(p['tpot_ms']['p50'], 1)} / {fmt(p['tpot_ms']['p99'], 1)} | "
            f"{fmt(p['itl_ms']['p50'], 1)} / {fmt(p['itl_ms']['p99'], 1)} | "
            f"{'–' if slo is None else f'{slo:.0%}'} | {errors} | "
            f"{fmt(loads, 0) if loads is not None else 'n/a'} / {fmt(evictions, 0) if evictions is not None else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweeps(series: dict[str, Sequence[dict[str, Any]]], path: Path, title: str) -> None:
    """Throughput and latency against offered load, one line per series, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output tok/s", lambda p: p["output_throughput"]),
        ("TTFT ms (p50 solid, p99 dashed)", None),
        ("TPOT ms (p50 solid, p99 dashed)", None),
        ("SLO attainment", lambda p: p["slo"]["attainment"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for (name, points), color in zip(series.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4,
                                     strict=False):
        rated = [p for p in points if p["offered_rate"] is not None]
        x = [p["offered_rate"] for p in rated]
        axes[0].plot(x, [p["output_throughput"] for p in rated], "o-", color=color, label=name)
        for ax, key in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
            ax.plot(x, [p[key]["p50"] for p in rated], "o-", color=color, label=name)
            ax.plot(x, [p[key]["p99"] for p in rated], "x--", color=color)
        axes[3].plot(x, [p["slo"]["attainment"] for p in rated], "o-", color=color, label=name)
        for p in points:
            if p["offered_rate"] is None:  # the all-at-once ceiling as a horizontal line
                axes[0].axhline(p["output_throughput"], color=color, linestyle=":", linewidth=1)
    for ax, (name, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[3].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combine(paths: Sequence[Path], out: Path, title: str) -> None:
    """One plot and one table over the series of several run_load.py JSON files."""
    series: dict[str, Sequence[dict[str, Any]]] = {}
    for path in paths:
        series.update(json.loads(Path(path).read_text())["series"])
    plot_sweeps(series, out.with_suffix(".png"), title)
    out.with_suffix(".md").write_text(markdown_table([p for points in series.values() for p in points]))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Combine run_load.py JSON files into one plot and table.")
    parser.add_argument("json", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Output prefix: OUT.png and OUT.md.")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    combine(args.json, args.out, args.title)
