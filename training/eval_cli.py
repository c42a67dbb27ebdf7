"""`quiver eval`: run a JSONL of prompts against served models and score the answers side by side.

Each `--model` (the base, an adapter, ...) answers every prompt through the OpenAI API, so any
OpenAI-compatible server works. The scores (exact match, JSON validity, JSON-schema validity,
regex; see `training.evaluate`) are printed as a table, one column per model, and with `--out`
written as scores.json, results.jsonl (one row per prompt and model) and scores.png.

Exit status: 0 scored, 2 bad input (bad lines, reported before anything is sent; an unknown
model), 1 the server could not be reached or refused the key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from training.evaluate import (
    EvalCase,
    EvalInputError,
    format_table,
    plot_scores,
    read_cases,
    score,
    summarize,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SCORES_NAME, RESULTS_NAME, PLOT_NAME = "scores.json", "results.jsonl", "scores.png"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 8


class ServerUnreachable(RuntimeError):
    """The server did not answer, or refused the key: nothing can be scored."""


class UnknownModels(ValueError):
    pass


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` on a `quiver` subparsers object (its `func` is `run_eval`)."""
    parser = subparsers.add_parser(
        "eval", help="Score served models (base and adapters) on a JSONL of prompts.", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("file", type=Path, help='Prompts JSONL: {"messages": [...]} or {"prompt": "..."} per line, '
                                                'with "expected", "json": true, "schema" or "regex" to score.')
    parser.add_argument("--model", dest="models", action="append", required=True, metavar="NAME",
                        help="A served model or adapter name; repeat to compare (e.g. the base and an adapter).")
    parser.add_argument("--base-url", default=os.environ.get("QUIVER_BASE_URL", DEFAULT_BASE_URL),
                        help="The server's OpenAI API root [env QUIVER_BASE_URL].")
    parser.add_argument("--api-key", default=None,
                        help="Bearer key for the server (default: $QUIVER_API_KEY, else $OPENAI_API_KEY).")
    parser.add_argument("--max-tokens", type=int, default=Sampling.max_tokens, help="Most tokens per answer.")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature, help="Sampling temperature.")
    parser.add_argument("--concurrency", type=int, default=Sampling.concurrency, help="Requests in flight.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds one request may take.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Directory for {SCORES_NAME}, {RESULTS_NAME} and {PLOT_NAME} (default: print only).")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    try:
        sampling = _sampling(args)
        cases = read_cases(args.file)  # every bad line reported before anything is sent
    except (EvalInputError, ValueError) as exc:
        print(f"quiver eval: {exc}", file=sys.stderr)
        return 2
    models = list(dict.fromkeys(args.models))
    try:
        rows, summary = asyncio.run(_evaluate_remote(args, models, cases, sampling))
    except ServerUnreachable as exc:
        print(f"quiver eval: {exc}", file=sys.stderr)
        return 1
    except UnknownModels as exc:
        print(f"quiver eval: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: {len(cases)} prompts, {len(models)} model(s)")
    print(format_table(summary, models))
    failed = [r for r in rows if r["error"]]
    for row in failed[:5]:
        print(f"line {row['line']} ({row['model']}): request failed: {row['error']}", file=sys.stderr)
    if args.out is not None:
        note = write_report(args.out, args.file, models, rows, summary, sampling)
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {args.out / SCORES_NAME}, {args.out / RESULTS_NAME}" + ("" if note else f", {args.out / PLOT_NAME}"))
    return 0


def _sampling(args: argparse.Namespace) -> Sampling:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be between 0 and 2, got {args.temperature}")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    return Sampling(max_tokens=args.max_tokens, temperature=args.temperature, concurrency=args.concurrency)


def api_root(base_url: str) -> str:
    """`http://host:8000` means its `/v1`; a URL with a path is taken as given."""
    url = base_url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


async def _evaluate_remote(args: argparse.Namespace, models: list[str], cases: list[EvalCase],
                           sampling: Sampling) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from openai import AsyncOpenAI

    key = args.api_key or os.environ.get("QUIVER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    async with AsyncOpenAI(base_url=api_root(args.base_url), api_key=key, max_retries=1,
                           timeout=args.timeout) as client:
        return await evaluate_models(client, models, cases, sampling)


async def evaluate_models(client: Any, models: Sequence[str], cases: Sequence[EvalCase],
                          sampling: Sampling = Sampling()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every case answered by every model through `client` (an `openai.AsyncOpenAI`), scored.

    Returns the rows (one per case and model, in file order) and `summarize`'s scores. Raises
    ServerUnreachable if the server cannot be reached or refuses the key, UnknownModels if it does
    not serve a model; a request that fails otherwise is recorded in its row and scores as failed.
    """
    await _check_models(client, models)
    gate = asyncio.Semaphore(sampling.concurrency)
    jobs = [(case, model) for case in cases for model in models]
    rows = await asyncio.gather(*(_answer(client, gate, case, model, sampling) for case, model in jobs))
    return list(rows), summarize(rows, models)


async def _check_models(client: Any, models: Sequence[str]) -> None:
    import openai

    try:
        served = {m.id async for m in client.models.list()}
    except openai.APIConnectionError as exc:
        raise ServerUnreachable(f"cannot reach the server at {client.base_url} ({exc}); is `quiver serve` "
                                "running there? (--base-url)") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise ServerUnreachable(f"the server at {client.base_url} refused the API key ({exc.status_code}); "
                                "pass it with --api-key") from None
    except openai.APIStatusError as exc:
        raise ServerUnreachable(f"the server at {client.base_url} answered {exc.status_code} to GET /models: "
                                f"{exc.message}") from None
    missing = [m for m in models if m not in served]
    if missing:
        raise UnknownModels(f"the server does not serve {missing}; it serves {sorted(served)}")


async def _answer(client: Any, gate: asyncio.Semaphore, case: EvalCase, model: str,
                  sampling: Sampling) -> dict[str, Any]:
    import openai

    output, error, finish = None, None, None
    async with gate:
        try:
            reply = await client.chat.completions.create(model=model, messages=case.messages,
                                                         max_tokens=sampling.max_tokens,
                                                         temperature=sampling.temperature)
            output, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
        except openai.APIConnectionError as exc:
            raise ServerUnreachable(f"lost the server at {client.base_url} while evaluating: {exc}") from None
        except openai.APIStatusError as exc:
            error = f"{exc.status_code}: {exc.message}"
    return {"line": case.line, **case.extra, "model": model, "output": output, "finish_reason": finish,
            "scores": score(case, output), "error": error}


def write_report(out: Path, source: Path | str, models: Sequence[str], rows: Sequence[dict[str, Any]],
                 summary: dict[str, Any], sampling: Sampling) -> str | None:
    """scores.json, results.jsonl and scores.png in `out`; a note when the plot was skipped."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"file": str(source), "models": list(models), "prompts": len({r["line"] for r in rows}),
              "sampling": asdict(sampling), "scores": summary}
    (out / SCORES_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(out / RESULTS_NAME, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return plot_scores(summary, models, out / PLOT_NAME)
