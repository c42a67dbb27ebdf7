"""Scoring for `quiver eval`: read an evaluation JSONL, score answers, summarize and show the scores.

One prompt per line: `{"messages": [...]}` (a chat) or `{"prompt": "..."}` (one user message),
with what to check, each optional:

- `"expected"`: the answer, compared after stripping whitespace (`exact_match`);
- `"json": true`: the answer parses as JSON (`json_valid`);
- `"schema"`: a JSON schema the parsed answer must satisfy (`schema_valid`; it also counts `json_valid`);
- `"regex"`: a pattern the answer must match somewhere (`regex_match`, Python `re.search`).

A metric is scored only on the lines that ask for it. Plain functions, no network: the
requests are sent by `training.eval_cli`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS: tuple[str, ...] = ("exact_match", "json_valid", "schema_valid", "regex_match")
_KEYS = {"messages", "prompt", "expected", "json", "schema", "regex", "id", "metadata"}
_ROLES = ("system", "user", "assistant")


class EvalInputError(ValueError):
    """An evaluation file with bad lines; `problems` holds `(line, reason)`, 1-based."""

    def __init__(self, label: str, problems: list[tuple[int, str]]) -> None:
        self.label, self.problems = label, problems
        lines = "\n".join(f"  line {line}: {reason}" for line, reason in problems)
        super().__init__(f"{label}: {len(problems)} bad line(s):\n{lines}")


@dataclass(frozen=True)
class EvalCase:
    line: int
    messages: list[dict[str, str]]
    expected: str | None = None
    json: bool = False
    schema: dict[str, Any] | None = None
    regex: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # `id`, `metadata`: copied into the results

    def metrics(self) -> list[str]:
        """The metrics this line asks for."""
        asked = {"exact_match": self.expected is not None, "json_valid": self.json or self.schema is not None,
                 "schema_valid": self.schema is not None, "regex_match": self.regex is not None}
        return [m for m in METRICS if asked[m]]


# ---------------------------------------------------------------------- reading
def read_cases(path: Path) -> list[EvalCase]:
    """Every case of the file; EvalInputError naming every bad line (nothing is half-read)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(str(path), [(0, f"cannot read the file: {exc}")]) from None
    return parse_cases(text.splitlines(), label=str(path))


def parse_cases(lines: Iterable[str], label: str = "<input>") -> list[EvalCase]:
    cases, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            cases.append(parse_case(raw, number))
        except ValueError as exc:
            problems.append((number, str(exc)))
    if problems:
        raise EvalInputError(label, problems)
    if not cases:
        raise EvalInputError(label, [(0, "no prompts: the file is empty")])
    return cases


def parse_case(raw: str, line: int) -> EvalCase:
    """One line; ValueError saying what is wrong with it."""
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected some of {sorted(_KEYS)}")
    if ("messages" in item) == ("prompt" in item):
        raise ValueError('give exactly one of "messages" and "prompt"')
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        messages = [{"role": "user", "content": item["prompt"]}]
    else:
        messages = _messages(item["messages"])
    expected = item.get("expected")
    if expected is not None and not isinstance(expected, str):
        expected = json.dumps(expected)  # {"expected": {"a": 1}} means that JSON text
    if not isinstance(item.get("json", False), bool):
        raise ValueError('"json" must be true or false')
    schema = item.get("schema")
    if schema is not None:
        _check_schema(schema)
    regex = item.get("regex")
    if regex is not None:
        if not isinstance(regex, str):
            raise ValueError('"regex" must be a string')
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f'"regex" {regex!r} is not a valid regular expression: {exc}') from None
    extra = {k: item[k] for k in ("id", "metadata") if k in item}
    return EvalCase(line=line, messages=messages, expected=expected, json=bool(item.get("json", False)),
                    schema=schema, regex=regex, extra=extra)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"messages[{index}] must be an object with a role in {list(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] == "assistant":
        raise ValueError('the last message is the assistant\'s: put the answer in "expected"')
    return out


def _check_schema(schema: Any) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError('"schema" must be a JSON object (a JSON schema)')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f'"schema" is not a valid JSON schema: {exc.message}') from None


def cases_from_chats(records: Iterable[dict[str, Any]]) -> list[EvalCase]:
    """Cases from fine-tuning chat examples (a job's validation file): the conversation up to its
    last assistant message is the prompt, that message the expected answer; an answer that is
    JSON also asks for `json_valid`. Text examples and chats without an assistant turn are skipped."""
    cases = []
    for line, record in enumerate(records, start=1):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            continue
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None)
        if last is None or last == 0 or not isinstance(messages[last].get("content"), str):
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        answer = messages[last]["content"]
        cases.append(EvalCase(line=line, messages=prompt, expected=answer, json=is_json(answer)))
    return cases


# ---------------------------------------------------------------------- scoring
def exact_match(output: str, expected: str) -> bool:
    return output.strip() == expected.strip()


def is_json(output: str) -> bool:
    try:
        json.loads(output)
    except ValueError:
        return False
    return True


def schema_valid(output: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        value = json.loads(output)
    except ValueError:
        return False
    validator = jsonschema.validators.validator_for(schema)(schema)
    return validator.is_valid(value)


def regex_match(output: str, pattern: str) -> bool:
    return re.search(pattern, output) is not None


def score(case: EvalCase, output: str | None) -> dict[str, bool]:
    """What `case` asks for, scored on `output` (None: the request failed, so everything fails)."""
    if output is None:
        return {metric: False for metric in case.metrics()}
    checks = {
        "exact_match": lambda: exact_match(output, case.expected or ""),
        "json_valid": lambda: is_json(output),
        "schema_valid": lambda: schema_valid(output, case.schema or {}),
        "regex_match": lambda: regex_match(output, case.regex or ""),
    }
    return {metric: checks[metric]() for metric in case.metrics()}


def summarize(results: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model, per metric asked for anywhere: `{"passed", "total", "rate"}`; plus `errors`, the
    requests that got no answer. `results` are rows with `model` and `scores` (and `error`)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in models:
        rows = [r for r in results if r["model"] == model]
        per: dict[str, dict[str, Any]] = {}
        for metric in METRICS:
            marks = [r["scores"][metric] for r in rows if metric in r["scores"]]
            if marks:
                passed = sum(bool(m) for m in marks)
                per[metric] = {"passed": passed, "total": len(marks), "rate": passed / len(marks)}
        per["errors"] = {"count": sum(1 for r in rows if r.get("error")), "total": len(rows)}
        summary[model] = per
    return summary


# ---------------------------------------------------------------------- showing
def format_table(summary: dict[str, dict[str, dict[str, Any]]], models: Sequence[str]) -> str:
    """Metrics down, models across: `rate (passed/total)`; a last row counts failed requests."""
    metrics = [m for m in METRICS if any(m in summary[model] for model in models)]
    header = ["metric", *models]
    rows = [[metric, *(_cell(summary[model].get(metric)) for model in models)] for metric in metrics]
    rows.append(["request errors", *(f"{summary[m]['errors']['count']}/{summary[m]['errors']['total']}"
                                     for m in models)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _cell(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['rate']:.2f} ({entry['passed']}/{entry['total']})"


def plot_scores(summary: dict[str, dict[str, dict[str, Any]]], models: Sequence[str], path: Path) -> str | None:
    """A grouped bar plot of the rates; None when written, else why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was written (pip install matplotlib)"
    metrics = [m for m in METRICS if any(m in summary[model] for model in models)]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(metrics) + 1), 3.2))
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        rates = [summary[model].get(metric, {}).get("rate", 0.0) for metric in metrics]
        positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(metrics))]
        bars = axes.bar(positions, rates, width, label=model)
        axes.bar_label(bars, fmt="%.2f", fontsize="x-small")
    axes.set_xticks(range(len(metrics)), metrics)
    axes.set_ylim(0, 1.3)  # room for the legend above the bars
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("rate")
    axes.legend(fontsize="small", loc="upper center", ncol=min(len(models), 4), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
