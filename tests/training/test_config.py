from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig


def _config(**overrides) -> TrainConfig:
    return TrainConfig(model="m", data=Path("d.jsonl"), output=Path("out/run-1"), **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"max_steps": -1}, "max_steps must be a non-negative integer"),
        ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"lora_alpha": -2.0}, "lora_alpha must be a positive number"),
        ({"lr_scheduler": "cyclic"}, "lr_scheduler must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"target_modules": ()}, "target_modules must be a non-empty list"),
        ({"save_total_limit": -1}, "save_total_limit must be a non-negative integer"),
    ],
)
def test_bad_settings_name_the_setting_and_value(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _config(**overrides)
    assert message in str(info.value)


def test_defaults_and_serialisation() -> None:
    config = _config(device="cuda:1", target_modules=["q_proj", "v_proj"])
    assert config.name == "run-1"
    assert _config(experiment_name="exp").name == "exp"
    data = config.to_dict()
    assert data["target_modules"] == ["q_proj", "v_proj"] and data["output"] == "out/run-1"
    assert data["validation_data"] is None and data["device"] == "cuda:1"
