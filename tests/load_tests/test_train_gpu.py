"""`load_tests/train_gpu.py --device cpu --tiny`: train with the real CLI, serve, compare with PEFT."""

from __future__ import annotations

import json
from pathlib import Path

from load_tests.train_gpu import main

HEADLINE = ("device", "bf16_tokens_per_s", "bf16_peak_memory_gb", "qlora_tokens_per_s", "qlora_peak_memory_gb",
            "served_bf16_ok", "served_qlora_ok")


def test_cpu_smoke_trains_serves_the_adapter_as_peft_does_and_skips_qlora(tmp_path: Path) -> None:
    out = tmp_path / "train-cpu"
    assert main(["--device", "cpu", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0

    result = json.loads(out.with_suffix(".json").read_text())
    assert set(HEADLINE) <= set(result)
    assert result["device"] == "cpu"
    train = result["training"]["bf16"]
    assert train["steps"] == 8 and train["trained_tokens"] == 8 * 8 * 48
    assert result["bf16_tokens_per_s"] == train["tokens_per_s"] > 0  # reported by the trainer's done event
    assert result["bf16_peak_memory_gb"] is None  # torch counts no CPU peak
    assert train["last_loss"] < train["first_loss"]

    served = result["serving"]["bf16"]
    assert served["answered"] and served["differs_from_base"]
    assert served["match"] == "equal" and served["served_tokens"] == served["reference_tokens"]  # fp32: exact
    assert result["served_bf16_ok"] is True

    assert "no CUDA device" in result["qlora_skipped"]
    assert result["qlora_tokens_per_s"] is None and result["served_qlora_ok"] is None
    table = out.with_suffix(".md").read_text()
    assert "| bf16 |" in table and "| qlora | skipped: no CUDA device" in table
