"""Online-serving load run: a sweep of offered rates (or one rate) against a Quiver server.

    # start a server here (demo model, 100 synthetic adapters) and sweep two popularity skews
    python load_tests/run_load.py --serve --num-adapters 100 --alpha 1 0.3 \
        --sweep 0.5:2:8 --duration 15 --input-len 8:64 --output-len 8:64 --out load_tests/results/cpu-n100

    # an already running server (only 127.0.0.1 / localhost / ::1)
    python load_tests/run_load.py --base-url http://127.0.0.1:8000 --num-adapters 8 --rate 2 --out /tmp/one

Writes OUT.json (every point, the configuration, the command), OUT.png and OUT.md. See
load_tests/README.md for the definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests import report  # noqa: E402
from load_tests.client import DriverConfig, check_loopback, run_workload  # noqa: E402
from load_tests.local_server import SubprocessServer  # noqa: E402
from load_tests.metrics import ServerProbe, delta, process_rss_bytes  # noqa: E402
from load_tests.workload import (  # noqa: E402
    ARRIVALS,
    LengthRange,
    WorkloadSpec,
    build_workload,
    is_saturated,
    rate_ladder,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="A running server (loopback addresses only).")
    target.add_argument("--serve", action="store_true", help="Start a server here for the run.")
    p.add_argument("--model", help="--serve: base model directory (default: the embedded demo model).")
    p.add_argument("--device", default="auto", help="--serve: cpu, cuda, cuda:N or auto.")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="--serve: one more `quiver serve` argument, e.g. --server-arg=--max-loras=8.")
    p.add_argument("--server-log", type=Path, help="--serve: write the server's output here.")
    p.add_argument("--adapter-rank", type=int, default=16, help="--serve: rank of the synthetic adapters.")
    p.add_argument("--adapter-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="--serve: modules the synthetic adapters target.")
    p.add_argument("--num-adapters", type=int, default=8, help="Distinct adapters requests pick from (0: base).")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0],
                   help="Popularity skew(s), one series each: 1 uniform, 0.3 skewed.")
    p.add_argument("--base-fraction", type=float, default=0.0, help="Share of requests for the base model.")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--cv", type=float, default=4.0, help="Coefficient of variation of gamma arrivals.")
    rates = p.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rate", type=float, help="One offered rate (req/s); `inf` sends all at once.")
    rates.add_argument("--rates", help="Comma-separated offered rates.")
    rates.add_argument("--sweep", help="START:FACTOR:MAX geometric rates, stopping after the first saturated one.")
    p.add_argument("--max-point", action="store_true",
                   help="Also run every request at once (the throughput ceiling).")
    p.add_argument("--max-point-requests", type=int, default=64,
                   help="Requests of the all-at-once point (--max-point, or --rate inf).")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds of arrivals per rate.")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="Seconds a point may run past its arrivals before the rest is cancelled.")
    p.add_argument("--input-len", type=LengthRange.parse, default=LengthRange(8, 512))
    p.add_argument("--output-len", type=LengthRange.parse, default=LengthRange(8, 512))
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="TTFT SLO in seconds.")
    p.add_argument("--slo-tpot", type=float, default=None, help="Optional TPOT SLO in seconds.")
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--warmup", type=int, default=4, help="Unrecorded requests before the first point.")
    p.add_argument("--api-key", default=os.environ.get("QUIVER_API_KEY", "none"))
    p.add_argument("--metric", action="append", default=[], metavar="KEY=NAME",
                   help="Pin the /metrics sample read for a quantity (e.g. adapter_gpu_loads=NAME).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="Title of the plot and table.")
    p.add_argument("--out", type=Path, required=True, help="Output prefix: OUT.json, OUT.png, OUT.md.")
    p.add_argument("--no-progress", action="store_true")
    return p


def offered_rates(args: argparse.Namespace) -> tuple[list[float], bool]:
    """(rates, stop at saturation)."""
    if args.rate is not None:
        return [args.rate], False
    if args.rates:
        return [float(r) for r in args.rates.split(",") if r.strip()], False
    start, factor, top = (float(x) for x in args.sweep.split(":"))
    return rate_ladder(start, factor, top), True


@contextlib.contextmanager
def target_server(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """(base URL, server pid or None) for the run; a started server is stopped afterwards."""
    if not args.serve:
        yield check_loopback(args.base_url), None
        return
    from load_tests.synthetic_adapters import write_adapters

    model = args.model
    if model is None:
        from engine.demo import ensure_demo_bundle

        model = str(ensure_demo_bundle().model_dir)
    with tempfile.TemporaryDirectory(prefix="quiver-load-adapters-") as tmp:
        adapters = write_adapters(Path(model), Path(tmp), args.num_adapters, rank=args.adapter_rank,
                                  targets=tuple(args.adapter_targets.split(",")), seed=args.seed)
        longest = args.input_len.high + args.output_len.high
        serve = ["--model", model, "--device", args.device, "--max-model-len", str(max(longest, 256)),
                 "--max-lora-rank", str(max(args.adapter_rank, 8))]
        serve += [f"--adapter={name}={path}" for name, path in adapters.items()]
        server = SubprocessServer(serve + args.server_arg, log_path=args.server_log)
        with server:
            yield server.base_url, server.pid


def served_models(base_url: str, api_key: str) -> tuple[str, list[str]]:
    body = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30).json()
    base = body["data"][0]["id"]
    return base, [m["id"] for m in body["data"][1:]]


def point_size(rate: float, args: argparse.Namespace) -> int:
    if math.isinf(rate):
        return args.max_point_requests
    return int(min(args.max_requests, max(args.min_requests, math.ceil(rate * args.duration))))


async def run_point(args: argparse.Namespace, driver: DriverConfig, spec: WorkloadSpec, names: list[str],
                    base: str, metrics: ServerProbe, pid: int | None, label: str) -> dict[str, Any]:
    plan = build_workload(spec)
    before = await asyncio.to_thread(metrics.read)
    arrivals_end = plan[-1].send_at if plan else 0.0
    records = await run_workload(plan, driver, lambda i: base if i is None else names[i],
                                 deadline_s=arrivals_end + args.drain_timeout,
                                 progress=not args.no_progress, label=label)
    after = await asyncio.to_thread(metrics.read)
    point = report.summarize(records, offered_rate=spec.rate, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
    counters = ("adapter_loads", "adapter_gpu_loads", "adapter_gpu_evictions", "adapter_host_evictions")
    point["server"] = {key: delta(before, after, key) for key in counters}
    point["server"]["rss_bytes"] = process_rss_bytes(pid) if pid is not None else None
    point["server"]["sources"] = {key: metrics.sources.get(key, metrics.missing()) for key in counters}
    return point


async def _point(args: argparse.Namespace, driver: DriverConfig, names: list[str], base: str,
                 metrics: ServerProbe, pid: int | None, series: str, alpha: float, rate: float,
                 index: int) -> dict[str, Any]:
    spec = WorkloadSpec(point_size(rate, args), rate, len(names), alpha, args.arrival,
                        args.cv if args.arrival == "gamma" else 1.0, args.input_len, args.output_len,
                        args.base_fraction, seed=args.seed + 1000 * index + int(alpha * 100))
    point = await run_point(args, driver, spec, names, base, metrics, pid, f"{series} rate={rate:g}")
    point["series"] = series
    _echo(point)
    return point


async def run(args: argparse.Namespace, base_url: str, pid: int | None) -> dict[str, Any]:
    base, adapters = served_models(base_url, args.api_key)
    if args.num_adapters > len(adapters):
        raise SystemExit(f"the server serves {len(adapters)} adapters; --num-adapters {args.num_adapters} is too many")
    names = adapters[: args.num_adapters]
    driver = DriverConfig(base_url, api_key=args.api_key, endpoint=args.endpoint,
                          max_in_flight=args.max_in_flight)
    metrics = ServerProbe(base_url, api_key=args.api_key, exact=dict(m.split("=", 1) for m in args.metric))
    if args.warmup:
        warm = WorkloadSpec(args.warmup, math.inf, len(names), input_len=args.input_len,
                            output_len=LengthRange(4, 8), seed=args.seed + 999_983)
        await run_workload(build_workload(warm), driver, lambda i: base if i is None else names[i],
                           deadline_s=args.drain_timeout)
    rates, stop_when_saturated = offered_rates(args)
    series: dict[str, list[dict[str, Any]]] = {}
    for alpha in args.alpha:
        name = f"N={len(names)} alpha={alpha:g}"
        points = series.setdefault(name, [])
        for i, rate in enumerate(rates):
            point = await _point(args, driver, names, base, metrics, pid, name, alpha, rate, i)
            points.append(point)
            # A run cut short (a time limit) keeps every finished point.
            report.write_json(args.out.with_suffix(".partial.json"), {"series": series})
            if stop_when_saturated and (is_saturated(point["arrival_rate"] or rate, point["sustained_rate"] or 0.0, 0.8)
                                        or (point["slo"]["attainment"] or 0.0) < 0.5):
                print(f"  saturated at {rate:g} req/s", file=sys.stderr)
                break
        if args.max_point:
            points.append(await _point(args, driver, names, base, metrics, pid, name, alpha, math.inf, len(rates)))
    return {"series": series, "server_state_notes": dict(metrics.notes)}


def _echo(point: dict[str, Any]) -> None:
    offered = "max" if point["offered_rate"] is None else f"{point['offered_rate']:g}"
    ttft = point["ttft_ms"]
    print(f"  rate {offered:>6} req/s: {point['request_throughput']:.2f} req/s, "
          f"{point['output_throughput']:.1f} out tok/s, TTFT p50 {report.fmt(ttft['p50'], 0)} ms "
          f"p99 {report.fmt(ttft['p99'], 0)} ms, errors {point['errors'] or 0}", file=sys.stderr)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "device": args.device}
    info["git"] = _git_revision()
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _git_revision() -> str | None:
    """The checkout's commit, with "+dirty" when the work tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    with target_server(args) as (base_url, pid):
        result = asyncio.run(run(args, base_url, pid))
    config = {k: (str(v) if isinstance(v, Path | LengthRange) else v) for k, v in vars(args).items()}
    config["input_len"] = [args.input_len.low, args.input_len.high]
    config["output_len"] = [args.output_len.low, args.output_len.high]
    document = {"command": "python load_tests/run_load.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                "config": config, "environment": environment(args),
                "wall_s": time.time() - started, **result}
    out: Path = args.out
    report.write_json(out.with_suffix(".json"), document)
    points = [p for pts in result["series"].values() for p in pts]
    (out.with_suffix(".md")).write_text(report.markdown_table(points))
    title = args.label or (f"{args.arrival} arrivals, input {args.input_len.low}-{args.input_len.high}, "
                           f"output {args.output_len.low}-{args.output_len.high} tokens")
    try:
        report.plot_sweeps(result["series"], out.with_suffix(".png"), title)
    except ImportError as exc:  # matplotlib is optional where the load runs; `report.py` plots later
        print(f"no plot ({exc}); run `python -m load_tests.report {out.with_suffix('.json')} --out PREFIX`",
              file=sys.stderr)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(json.dumps({"json": str(out.with_suffix(".json")), "points": len(points)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
