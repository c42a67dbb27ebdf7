"""OUT.json and OUT.md of `load_tests/train_gpu.py`: the headline keys, a table, the command."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RUNS = ("bf16", "qlora")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline keys of OUT.json, from the per-run details."""
    out: dict[str, Any] = {}
    for run in RUNS:
        train = result["training"].get(run) or {}
        out[f"{run}_tokens_per_s"] = train.get("tokens_per_s")
        out[f"{run}_peak_memory_gb"] = train.get("peak_memory_gb")
        served = result["serving"].get(run)
        out[f"served_{run}_ok"] = None if served is None else served["ok"]
    out["device"] = result["device"]
    return out


def write_report(out: Path, result: dict[str, Any]) -> None:
    """OUT.json (everything) and OUT.md (a table and the command)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**summary(result), **result}, indent=2) + "\n")
    lines = [f"# `quiver train` on {result['device']}: {result['shape']}, then served by Quiver", "",
             "| run | tokens/s (loop) | tokens/s (steady) | peak GPU memory (GB) | train s | loss first → last "
             "| served | matches PEFT | differs from base | learned answer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        train, served = result["training"].get(run), result["serving"].get(run)
        if train is None or "error" in train:
            why = f"skipped: {result['qlora_skipped']}" if train is None else "training failed (see OUT.json)"
            lines.append(f"| {run} | {why} |  |  |  |  |  |  |  |  |")
            continue
        s = served or {}
        if "error" in s:
            s = {"answered": f"error: {s['error'][:80]}"}
        lines.append(f"| {run} | {_fmt(train['tokens_per_s'])} | {_fmt(train['steady_tokens_per_s'])} | "
                     f"{_fmt(train['peak_memory_gb'])} | {_fmt(train['train_seconds'])} | "
                     f"{_fmt(train['first_loss'])} → {_fmt(train['last_loss'])} | {s.get('answered')} | "
                     f"{s.get('match')} | {s.get('differs_from_base')} | {s.get('learned_answer')} |")
    lines.append("")
    for run, check in result["serving"].items():
        if "error" in check:
            lines.append(f"- {run}: {check['error']}")
        else:
            lines.append(f"- {run} against PEFT: {check['match_detail']}; largest logprob difference before any "
                         f"divergence {check['max_logprob_diff_vs_reference']} nats; against the base model "
                         f"{check['max_logprob_gap_vs_base']} nats")
    cfg = result["config"]
    lines += ["", f"{cfg['steps']} steps of {cfg['batch_size']} × {cfg['seq_len']} tokens, LoRA rank {cfg['rank']} "
              f"on all seven projections, lr {cfg['lr']}; greedy check over {cfg['check_tokens']} tokens, "
              f"near-tie tolerance {cfg['tolerance']} nats. The QLoRA adapter is served (and its PEFT "
              "reference run) on the bf16 base.", "", "Phases (s): "
              + ", ".join(f"{k} {v}" for k, v in result["phases_s"].items()), "", "```", result["command"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return "–" if value is None else str(value)


def versions() -> dict[str, str | None]:
    """Installed versions of what the numbers depend on (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
