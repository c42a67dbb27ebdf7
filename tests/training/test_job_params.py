from __future__ import annotations

from pathlib import Path

import pytest

from training.cli import add_train_arguments, config_from_args
from training.errors import InvalidRequestError
from training.job_params import (
    AUTO,
    BASE_LEARNING_RATE,
    cli_arguments,
    merge_hyperparameters,
    resolve_hyperparameters,
    train_config,
)


def test_auto_values_are_resolved() -> None:
    assert resolve_hyperparameters({}) == AUTO
    assert resolve_hyperparameters({"n_epochs": "auto", "batch_size": 4}) == {**AUTO, "batch_size": 4}


def test_method_supervised_hyperparameters_win_over_the_deprecated_field() -> None:
    merged = merge_hyperparameters({"n_epochs": 2, "batch_size": 4},
                                   {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}})
    assert merged == {"n_epochs": 5, "batch_size": 4}


@pytest.mark.parametrize(
    ("raw", "param", "text"),
    [
        ({"n_epochs": 0}, "hyperparameters", "epochs must be a positive integer"),
        ({"n_epochs": 2.5}, "hyperparameters.n_epochs", "must be int"),
        ({"batch_size": True}, "hyperparameters.batch_size", "must be int"),
        ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier", "must be positive"),
        ({"lora_rank": "8"}, "hyperparameters.lora_rank", "must be int"),
        ({"target_modules": []}, "hyperparameters.target_modules", "must be list"),
        ({"lora_dropout": 2.0}, "hyperparameters", "lora_dropout must be in [0, 1)"),
        ({"colour": "red"}, "hyperparameters.colour", "unknown hyperparameter"),
        ({"use_dora": "yes"}, "hyperparameters.use_dora", "must be bool"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_field(raw: dict, param: str, text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_hyperparameters(raw)
    assert info.value.param == param
    assert text in info.value.message


def test_only_supervised_is_supported() -> None:
    with pytest.raises(InvalidRequestError, match="'dpo' is not supported") as info:
        merge_hyperparameters(None, {"type": "dpo"})
    assert info.value.param == "method.type"


def test_cli_arguments_round_trip_through_the_train_parser() -> None:
    import argparse

    hp = resolve_hyperparameters({"n_epochs": 4, "learning_rate_multiplier": 10, "lora_rank": 4,
                                  "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "max_steps": 9})
    config = train_config(hp, model="base", data=Path("t.jsonl"), output=Path("o"),
                          validation_data=Path("v.jsonl"), seed=7, name="ft-x")
    assert config.learning_rate == pytest.approx(10 * BASE_LEARNING_RATE)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    again = config_from_args(parser.parse_args(cli_arguments(config)))
    assert again == config
