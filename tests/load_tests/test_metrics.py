"""Reading server state: Prometheus text, name lookup, sources in order, RSS; chaos inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from load_tests.chaos import BROKEN_KINDS, fuzzed_bodies, invalid_requests, write_broken_adapters
from load_tests.metrics import DEFAULT_PATTERNS, ServerProbe, delta, find, parse_samples, process_rss_bytes
from load_tests.synthetic_adapters import write_adapters

PROM = """\
# HELP quiver_adapter_gpu_loads_total Adapter copies into GPU slots.
# TYPE quiver_adapter_gpu_loads_total counter
quiver_adapter_gpu_loads_total{adapter="a"} 3
quiver_adapter_gpu_loads_total{adapter="b"} 4
# HELP quiver_adapter_loads_total Adapter loads from disk.
# TYPE quiver_adapter_loads_total counter
quiver_adapter_loads_total 5
# HELP quiver_adapter_gpu_evictions_total Evictions.
# TYPE quiver_adapter_gpu_evictions_total counter
quiver_adapter_gpu_evictions_total 2
# HELP quiver_kv_free_blocks Free KV blocks.
# TYPE quiver_kv_free_blocks gauge
quiver_kv_free_blocks 90
# HELP quiver_kv_total_blocks KV blocks.
# TYPE quiver_kv_total_blocks gauge
quiver_kv_total_blocks 100
"""


def test_parse_and_find() -> None:
    samples = parse_samples(PROM)
    assert samples["quiver_adapter_gpu_loads_total"] == 7  # summed over labels
    assert not any(name.endswith("_created") for name in samples)
    assert find(samples, DEFAULT_PATTERNS["adapter_loads"]) == ("quiver_adapter_loads_total", 5)
    assert find(samples, DEFAULT_PATTERNS["adapter_gpu_loads"]) == ("quiver_adapter_gpu_loads_total", 7)
    assert find(samples, DEFAULT_PATTERNS["kv_blocks_free"])[1] == 90
    assert find(samples, DEFAULT_PATTERNS["kv_blocks_total"])[1] == 100
    assert find(samples, DEFAULT_PATTERNS["adapter_refcount"]) is None


class _Engine:
    def stats(self) -> dict[str, int]:
        return {"num_free_blocks": 7, "num_total_blocks": 8, "adapter_refcount_total": 1}


def test_probe_prefers_the_engine_and_says_why_the_rest_is_missing() -> None:
    probe = ServerProbe("http://127.0.0.1:9", engine=_Engine(), timeout_s=0.5)  # nothing listens there
    state = probe.read()
    assert (state["kv_blocks_free"], state["kv_blocks_total"], state["adapter_refcount"]) == (7, 8, 1)
    assert probe.sources["kv_blocks_free"] == "engine"
    assert state["adapter_gpu_loads"] is None and state["refcounts"] is None
    assert "GET /metrics failed" in probe.missing()


def test_delta_and_rss() -> None:
    assert delta({"x": 3}, {"x": 5}, "x") == 2
    assert delta({"x": None}, {"x": 5}, "x") is None
    assert process_rss_bytes(os.getpid()) > 10 << 20


def test_invalid_and_fuzzed_requests() -> None:
    cases = invalid_requests("base")
    assert len({c.kind for c in cases}) == len(cases)
    fuzz = fuzzed_bodies("base", np.random.default_rng(0), 20)
    assert fuzz == fuzzed_bodies("base", np.random.default_rng(0), 20)
    assert all(c.body for c in fuzz)


def test_synthetic_and_broken_adapters(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
         "num_hidden_layers": 2}))
    made = write_adapters(model, tmp_path / "adapters", 3, rank=4, targets=("q_proj", "k_proj", "down_proj"))
    assert sorted(made) == ["lora-0000", "lora-0001", "lora-0002"]
    from safetensors.torch import load_file

    tensors = load_file(str(made["lora-0001"] / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1"
    assert tensors[f"{prefix}.self_attn.k_proj.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert tensors[f"{prefix}.mlp.down_proj.lora_A.weight"].shape == (4, 48)
    other = load_file(str(made["lora-0000"] / "adapter_model.safetensors"))
    assert not (other[f"{prefix}.self_attn.k_proj.lora_B.weight"] == tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"]).all()
    config = json.loads((made["lora-0000"] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "k_proj", "q_proj"]
    with pytest.raises(ValueError, match="unknown target"):
        write_adapters(model, tmp_path / "bad", 1, targets=("lm_head",))
    broken = write_broken_adapters(tmp_path / "root", made["lora-0000"])
    assert sorted(broken) == sorted(BROKEN_KINDS)
    assert (broken["broken-pickle"] / "adapter_model.bin").exists()


def test_kv_blocks_free_is_derived_from_quivers_used_and_total(monkeypatch) -> None:
    probe = ServerProbe(base_url="http://127.0.0.1:1")
    samples = {"quiver_kv_cache_blocks_total": 64.0, "quiver_kv_cache_blocks_used": 5.0}
    monkeypatch.setattr(probe, "metrics", lambda: samples)
    monkeypatch.setattr(probe, "adapters", lambda: None)
    state = probe.read()
    assert state["kv_blocks_total"] == 64.0 and state["kv_blocks_free"] == 59.0
