"""Soak / chaos run: bounded rounds of mixed traffic, with the server's invariants checked.

    python load_tests/soak.py --serve --duration 120 --out load_tests/results/soak-cpu
    python load_tests/soak.py --base-url http://127.0.0.1:8000 --duration 600 --out /tmp/soak

Each round sends, at random moments within `--round-seconds`: valid requests at temperature 0
(chat and legacy, streamed or not, base and adapters), invalid requests, fuzzed bodies, and
streams the client drops (before the headers, or after a few chunks); plus, when the adapter
admin API exists, adapter churn (register a copy of a served adapter, promote, demote, delete
while a stream is running on it) and registration of deliberately broken adapters. `/health` is
polled the whole time. With `--churn-adapters N`, a share of the valid requests goes to N adapters
written into the adapter root after the references are taken (more than the GPU and host slots),
so they are loaded on demand and evicted from both tiers all run long (load_tests/churn.py).
After each round, once the server is idle, the state checks run. The invariants, and where each
reads its data, are listed in load_tests/README.md; any violation makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.chaos import write_broken_adapters  # noqa: E402
from load_tests.churn import POPULARITIES, ChurnConfig, churn_summary  # noqa: E402
from load_tests.client import check_loopback  # noqa: E402
from load_tests.local_server import SubprocessServer, serve_option_supported  # noqa: E402
from load_tests.report import write_json  # noqa: E402
from load_tests.soak_run import SoakConfig, run_soak  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="A running server (loopback addresses only).")
    target.add_argument("--serve", action="store_true",
                        help="Start a server here: the given (or demo) model, its adapters and synthetic ones.")
    p.add_argument("--model", help="--serve: base model directory (default: the embedded demo model).")
    p.add_argument("--device", default="auto", help="--serve: cpu, cuda, cuda:N or auto.")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--server-log", type=Path)
    p.add_argument("--synthetic-adapters", type=int, default=4, help="--serve: extra random adapters to serve.")
    p.add_argument("--adapter-root", type=Path,
                   help="The server's adapter root (--base-url): churn copies and broken adapters go there.")
    p.add_argument("--adapter-source", action="append", default=[], metavar="NAME=DIR",
                   help="--base-url: the directory a served adapter was loaded from (to copy it for churn).")
    p.add_argument("--server-pid", type=int, help="--base-url: the server's pid, for its RSS.")
    p.add_argument("--duration", type=float, default=60.0,
                   help="Seconds of rounds after the references are taken; the run then ends by itself.")
    p.add_argument("--max-rounds", type=int, default=1000)
    p.add_argument("--round-seconds", type=float, default=5.0)
    p.add_argument("--valid", type=int, default=12, help="Valid requests per round.")
    p.add_argument("--invalid", type=int, default=6, help="Invalid requests per round.")
    p.add_argument("--fuzz", type=int, default=4, help="Fuzzed bodies per round.")
    p.add_argument("--disconnects", type=int, default=4, help="Dropped streams per round.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--tie-tolerance", type=float, default=0.0, metavar="NATS",
                   help="0 (default): every output must equal its reference exactly. Above 0 (e.g. 0.05 in "
                        "bf16 on a GPU): a text that differs passes where the tokens part at a near-tie, the "
                        "request's token at most NATS below the reference's; such outputs are counted.")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="Seconds one request may take; a round may overrun --duration by at most this.")
    p.add_argument("--adapters", type=int, default=4, help="Served adapters the valid traffic uses.")
    p.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    p.add_argument("--gpu-tolerance-mb", type=float, default=16.0)
    p.add_argument("--api-key", default="none")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=NAME")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="Output prefix: OUT.json and OUT.md.")
    churn = p.add_argument_group(
        "adapter churn", "N adapters of mixed ranks (4/8/16) and target sets, written into the adapter root "
        "once the references are taken, more than the GPU and host slots: loaded on demand under load.")
    churn.add_argument("--churn-adapters", type=int, default=0, metavar="N",
                       help="On-demand adapters (0: none). With --base-url, --model and --adapter-root are needed.")
    churn.add_argument("--churn-share", type=float, default=0.5,
                       help="Share of each round's --valid requests sent to churn adapters.")
    churn.add_argument("--churn-popularity", choices=POPULARITIES, default="uniform",
                       help="uniform, or zipf (weight 1/k), topped up so a round touches more adapters than "
                            "host slots.")
    churn.add_argument("--churn-gpu-slots", type=int, default=8,
                       help="The server's GPU LoRA slots; --serve starts it with --max-loras this.")
    churn.add_argument("--churn-host-slots", type=int, default=16,
                       help="The server's host adapter slots; --serve starts it with --max-cpu-adapters this.")
    return p


_SLOT_FLAGS = ("--max-loras", "--max-gpu-adapters", "--max-cpu-adapters")


def churn_config(args: argparse.Namespace, model_dir: Path) -> ChurnConfig | None:
    """The churn run the arguments ask for (None without --churn-adapters); ValueError if impossible."""
    if not args.churn_adapters:
        return None
    cfg = ChurnConfig(adapters=args.churn_adapters, model_dir=model_dir, gpu_slots=args.churn_gpu_slots,
                      host_slots=args.churn_host_slots, share=args.churn_share, popularity=args.churn_popularity,
                      seed=args.seed)
    cfg.check_round(args.valid)
    return cfg


def churn_server_args(args: argparse.Namespace) -> list[str]:
    """--serve: the slot counts that make the churn adapters exceed both tiers."""
    if not args.churn_adapters:
        return []
    return ["--max-loras", str(args.churn_gpu_slots), "--max-cpu-adapters", str(args.churn_host_slots)]


def check_churn_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.churn_adapters:
        return
    try:
        churn_config(args, Path(args.model or "."))
    except ValueError as exc:
        parser.error(f"--churn-adapters: {exc}")
    if args.serve and any(a.split("=", 1)[0] in _SLOT_FLAGS for a in args.server_arg):
        parser.error("--churn-adapters sets the slots itself: use --churn-gpu-slots/--churn-host-slots, "
                     "not --server-arg=--max-loras/--max-cpu-adapters")
    if not args.serve and (args.model is None or args.adapter_root is None):
        parser.error("--churn-adapters with --base-url needs --model (the shapes) and --adapter-root")


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[tuple[str, int | None, Path | None, dict[str, Path], Path]]:
    """(base URL, server pid, adapter root, served adapter dirs, model directory) for the run."""
    if not args.serve:
        sources = {k: Path(v) for k, v in (item.split("=", 1) for item in args.adapter_source)}
        yield check_loopback(args.base_url), args.server_pid, args.adapter_root, sources, Path(args.model or ".")
        return
    from load_tests.synthetic_adapters import write_adapters

    with tempfile.TemporaryDirectory(prefix="quiver-soak-") as tmp:
        work = Path(tmp)
        if args.model is None:
            from engine.demo import ensure_demo_bundle

            bundle = ensure_demo_bundle()
            model, sources = str(bundle.model_dir), dict(bundle.adapters)
        else:
            model, sources = args.model, {}
        sources.update(write_adapters(Path(model), work / "synthetic", args.synthetic_adapters,
                                      rank=8, seed=args.seed, prefix="soak-"))
        serve = ["--model", model, "--device", args.device, *churn_server_args(args), *args.server_arg]
        serve += [f"--adapter={name}={path}" for name, path in sources.items()]
        root: Path | None = work / "root"
        root.mkdir()
        if serve_option_supported("--adapter-root"):
            serve += ["--adapter-root", str(root)]
        else:
            root = None
        with SubprocessServer(serve, log_path=args.server_log) as server:
            yield server.base_url, server.pid, root, sources, Path(model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tie_tolerance < 0:
        parser.error("--tie-tolerance must be 0 or more")
    check_churn_args(parser, args)
    started = time.time()
    with target(args) as (base_url, pid, root, sources, model_dir):
        if root is not None and sources:
            write_broken_adapters(root, next(iter(sources.values())))
        config = SoakConfig(
            base_url=base_url, api_key=args.api_key, duration_s=args.duration, max_rounds=args.max_rounds,
            round_s=args.round_seconds, valid_per_round=args.valid, invalid_per_round=args.invalid,
            fuzz_per_round=args.fuzz, disconnects_per_round=args.disconnects, max_tokens=args.max_tokens,
            num_adapters=args.adapters, adapter_root=root, adapter_sources=sources,
            rss_tolerance_bytes=int(args.rss_tolerance_mb * 2**20),
            gpu_tolerance_bytes=int(args.gpu_tolerance_mb * 2**20), seed=args.seed, pid=pid,
            request_timeout_s=args.request_timeout,
            exact_metrics=dict(m.split("=", 1) for m in args.metric), tie_tolerance=args.tie_tolerance,
            churn=churn_config(args, model_dir),
        )
        result = asyncio.run(run_soak(config))
    result["command"] = "python load_tests/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["wall_s"] = time.time() - started
    write_json(args.out.with_suffix(".json"), result)
    args.out.with_suffix(".md").write_text(summary_markdown(result))
    print(json.dumps({"violations": len(result["violations"]), "checks": result["checks"]}, indent=1))
    return 1 if result["violations"] else 0


def summary_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Soak run: {len(result['rounds'])} rounds in {result['elapsed_s']:.0f} s", "",
             f"`{result.get('command', '')}`", "", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {outcome} |" for name, outcome in result["checks"].items()]
    tie = result.get("near_tie")
    if tie is not None:
        gap = "–" if tie["max_gap_nats"] is None else f"{tie['max_gap_nats']:.4g}"
        lines += ["", f"Outputs that diverged from their reference at a near-tie (accepted, tolerance "
                      f"{tie['tolerance_nats']} nats): {tie['accepted']}, largest gap {gap} nats. The rest "
                      "of such a text is not compared."]
        lines += [f"- round {t['round']}, {t['request']}: {t['detail']}" for t in tie["examples"][:10]]
    if "adapter_churn" in result:
        lines += churn_summary(result["adapter_churn"])
    lines += ["", "| traffic | statuses |", "|---|---|"]
    for kind, statuses in sorted(result["counts"].items()):
        lines.append(f"| {kind} | " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())) + " |")
    lines += ["", "| round | RSS MB | KV free / total | refcount | health max ms |", "|---|---|---|---|---|"]
    for r in result["rounds"]:
        rss = "–" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['round']} | {rss} | {r['kv_blocks_free']} / {r['kv_blocks_total']} | "
                     f"{r['adapter_refcount']} | {r['health_max_ms']:.0f} |")
    if result["violations"]:
        lines += ["", "## Violations", ""] + [f"- round {v['round']}, {v['kind']}: {v['detail']}"
                                               for v in result["violations"][:50]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
