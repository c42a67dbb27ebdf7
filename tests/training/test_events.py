from __future__ import annotations

import json
from pathlib import Path

from training.events import EventLog, plot_losses, read_events


def test_events_are_json_lines_with_type_and_time(tmp_path: Path) -> None:
    seen = []
    with EventLog(tmp_path / "ev" / "events.jsonl", listener=seen.append) as log:
        log.message("hello")
        log.emit("metrics", step=1, train_loss=float("nan"), path=tmp_path)
        log.error("boom", code="training_error", param="training_file")
    lines = [json.loads(line) for line in (tmp_path / "ev" / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in lines] == ["message", "metrics", "error"]
    assert all(isinstance(e["time"], float) for e in lines)
    assert lines[1]["train_loss"] is None  # NaN is not JSON
    assert lines[1]["path"] == str(tmp_path)
    assert lines[2] == {**lines[2], "code": "training_error", "param": "training_file", "message": "boom"}
    assert seen == lines


def test_read_events_resumes_and_skips_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "a"}\n{"type": "b"}\n{"type": "c", "half')
    events, offset = read_events(path)
    assert [e["type"] for e in events] == ["a", "b"]
    with open(path, "a") as handle:
        handle.write('": 1}\n{"type": "d"}\n')
    more, offset2 = read_events(path, offset)
    assert [e["type"] for e in more] == ["c", "d"]
    assert read_events(path, offset2) == ([], offset2)
    assert read_events(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_plot_draws_a_png_from_metrics(tmp_path: Path) -> None:
    events = [{"type": "metrics", "step": s, "train_loss": 3.0 / s, "valid_loss": 2.0 / s if s % 2 == 0 else None}
              for s in range(1, 9)]
    path = plot_losses(events, tmp_path / "out" / "loss.png", "run")
    assert path is not None
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert plot_losses([{"type": "message", "message": "x"}], tmp_path / "none.png", "run") is None
    assert not (tmp_path / "none.png").exists()
