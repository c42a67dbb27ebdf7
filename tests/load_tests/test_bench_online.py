"""bench_online.py end to end on the CPU (a smoke run: the plumbing and the report, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_smoke_run_reports_both_populations_with_the_issues_keys(tmp_path: Path) -> None:
    out = tmp_path / "online"
    subprocess.run([sys.executable, "load_tests/bench_online.py", "--out", str(out), "--device", "cpu",
                    "--layers", "1", "--requests", "4", "--lengths", "4", "8", "--adapters", "2", "--slots", "2",
                    "--timeout", "120"], cwd=ROOT, check=True, timeout=300, capture_output=True)
    result = json.loads(out.with_suffix(".json").read_text())
    for key in ("device", "online_over_offline_base", "online_over_offline_adapters", "itl_p50_ms",
                "offline_step_ms"):
        assert key in result, key
    for label in ("base", "adapters"):
        run = result[label]
        assert run["online"]["failed"] == 0
        # Forced lengths: both sides produced exactly the planned tokens.
        assert run["online"]["output_tokens"] == run["offline"]["output_tokens"] > 0
    assert "| adapters |" in out.with_suffix(".md").read_text()
