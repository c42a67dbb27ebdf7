from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.errors import UnsupportedAdapterError
from training.checkpoints import (
    list_checkpoints,
    prune_checkpoints,
    read_metadata,
    save_adapter,
    save_checkpoint,
)


def _peft_model(model_dir: Path, **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj", "down_proj"],
                        task_type="CAUSAL_LM", init_lora_weights=False, **extra)
    return get_peft_model(base, config)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


def test_saved_adapter_is_peft_with_metadata_and_sorted_targets(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "events.jsonl").write_text("{}\n")
    save_adapter(_peft_model(model_dir), out, {"base_model": "b", "step": 3})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").is_file()
    assert read_metadata(out) == {"base_model": "b", "step": 3}
    assert (out / "events.jsonl").read_text() == "{}\n"  # the run's other files are left alone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_an_adapter_the_server_would_refuse_is_not_published(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(UnsupportedAdapterError, match="bias"):  # it trains the base's biases
        save_checkpoint(_peft_model(model_dir, bias="all"), tmp_path, 5, {})
    assert list_checkpoints(tmp_path) == []
    save_checkpoint(_peft_model(model_dir, bias="all"), tmp_path, 5, {}, servable=False)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5]


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 2, 30, 4):
        d = tmp_path / "checkpoints" / f"ckpt-{step}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_text("x")
    (tmp_path / "checkpoints" / ".ckpt-50-staging").mkdir()
    (tmp_path / "checkpoints" / "ckpt-60").mkdir()  # incomplete: not a checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 10, 30]
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in removed] == [2, 4]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 30]
    assert not (tmp_path / "checkpoints" / "ckpt-2").exists()
    assert read_metadata(tmp_path / "nowhere") == {}
