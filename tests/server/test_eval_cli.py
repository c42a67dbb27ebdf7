"""`quiver eval` against a live tiny server: the base and an adapter scored side by side, the files it
writes, and its exit status on bad input, an unknown model and a server that is not there."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from openai import OpenAI

from server import cli
from tests.server.conftest import MODEL_NAME, LiveServer

ADAPTER = "lora-1"
PROMPTS = ["Tell me about arrows.", "What is a bow?"]


def _answer(client: OpenAI, model: str, prompt: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=8, temperature=0)
    return reply.choices[0].message.content or ""


def _write(path: Path, items: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_base_and_adapter_are_scored_side_by_side(live: LiveServer, client: OpenAI, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = [_answer(client, MODEL_NAME, p) for p in PROMPTS]
    tuned = [_answer(client, ADAPTER, p) for p in PROMPTS]
    assert base[0] != tuned[0] and base[1] != tuned[1]  # the adapter changes the answers
    data = _write(tmp_path / "eval.jsonl", [
        {"prompt": PROMPTS[0], "expected": f"  {base[0]}\n"},  # the base's answer: only the base passes
        {"messages": [{"role": "user", "content": PROMPTS[1]}], "expected": tuned[1],  # the adapter's
         "regex": "^" + re.escape(tuned[1][:3])},
        {"prompt": PROMPTS[0], "schema": {"type": "object"}},  # neither answers JSON
    ])
    out = tmp_path / "report"
    code = cli.main(["eval", str(data), "--base-url", live.base_url, "--model", MODEL_NAME, "--model", ADAPTER,
                     "--max-tokens", "8", "--concurrency", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed

    report = json.loads((out / "scores.json").read_text())
    assert report["models"] == [MODEL_NAME, ADAPTER] and report["prompts"] == 3
    scores = report["scores"]
    assert scores[MODEL_NAME]["exact_match"] == {"passed": 1, "total": 2, "rate": 0.5}
    assert scores[ADAPTER]["exact_match"] == {"passed": 1, "total": 2, "rate": 0.5}
    assert scores[ADAPTER]["regex_match"]["passed"] == 1
    assert scores[MODEL_NAME]["regex_match"]["passed"] == int(base[1].startswith(tuned[1][:3]))
    for model in (MODEL_NAME, ADAPTER):
        assert scores[model]["json_valid"]["total"] == 1 and scores[model]["schema_valid"]["passed"] == 0
        assert scores[model]["errors"] == {"count": 0, "total": 3}

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["line"], r["model"]) for r in rows] == [(1, MODEL_NAME), (1, ADAPTER), (2, MODEL_NAME),
                                                        (2, ADAPTER), (3, MODEL_NAME), (3, ADAPTER)]
    assert rows[0]["output"] == base[0] and rows[0]["scores"] == {"exact_match": True}
    assert rows[1]["output"] == tuned[0] and rows[1]["scores"] == {"exact_match": False}
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"

    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", MODEL_NAME, ADAPTER]
    exact = next(line for line in printed.splitlines() if line.startswith("exact_match"))
    assert exact.split() == ["exact_match", "0.50", "(1/2)", "0.50", "(1/2)"]


def test_bad_lines_are_reported_before_anything_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": ""}, {"prompt": "x", "regex": "["}])
    # No server listens there: exit 2, not 1, shows nothing was sent.
    code = cli.main(["eval", str(data), "--base-url", f"http://127.0.0.1:{_free_port()}", "--model", "m"])
    err = capsys.readouterr().err
    assert code == 2
    assert "line 2:" in err and "line 3:" in err and "line 1:" not in err


def test_an_unreachable_server_exits_1_with_a_clear_message(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "eval.jsonl", [{"prompt": "x", "expected": "y"}])
    url = f"http://127.0.0.1:{_free_port()}"
    assert cli.main(["eval", str(data), "--base-url", url, "--model", "m"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the server at {url}/v1" in err


def test_a_model_the_server_does_not_serve_is_bad_input(live: LiveServer, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "eval.jsonl", [{"prompt": "x", "expected": "y"}])
    assert cli.main(["eval", str(data), "--base-url", live.base_url, "--model", "no-such-adapter"]) == 2
    assert "does not serve ['no-such-adapter']" in capsys.readouterr().err


def test_a_server_key_is_sent_and_a_wrong_one_exits_1(start_server, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    keyed = start_server(adapters={}, api_key="secret")
    data = _write(tmp_path / "eval.jsonl", [{"prompt": "x", "regex": "."}])
    assert cli.main(["eval", str(data), "--base-url", keyed.base_url, "--model", MODEL_NAME,
                     "--api-key", "wrong"]) == 1
    assert "refused the API key" in capsys.readouterr().err
    assert cli.main(["eval", str(data), "--base-url", keyed.base_url, "--model", MODEL_NAME,
                     "--api-key", "secret", "--max-tokens", "4"]) == 0
    assert "regex_match" in capsys.readouterr().out


def test_the_readme_example_file_is_valid_input() -> None:
    from training.evaluate import parse_cases

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("cat > eval.jsonl <<'JSONL'\n", 1)[1].split("\nJSONL\n", 1)[0]
    cases = parse_cases(block.splitlines())
    assert [c.metrics() for c in cases] == [["exact_match"], ["json_valid", "schema_valid"], ["regex_match"]]


def test_a_refused_request_is_recorded_and_scores_as_failed(live: LiveServer, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "eval.jsonl", [{"prompt": "arrow " * 400, "regex": ""},  # beyond the 256-token context
                                            {"prompt": "short", "regex": ""}])
    out = tmp_path / "report"
    assert cli.main(["eval", str(data), "--base-url", live.base_url, "--model", MODEL_NAME, "--max-tokens", "4",
                     "--out", str(out)]) == 0
    assert "line 1 (tiny-base): request failed: 400" in capsys.readouterr().err
    scores = json.loads((out / "scores.json").read_text())["scores"][MODEL_NAME]
    assert scores["regex_match"] == {"passed": 1, "total": 2, "rate": 0.5}
    assert scores["errors"] == {"count": 1, "total": 2}
    first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert first["output"] is None and first["error"].startswith("400")
