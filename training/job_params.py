"""A fine-tuning job's hyperparameters: OpenAI's three, Quiver's extras, and the CLI flags they become.

OpenAI's `n_epochs`, `batch_size` and `learning_rate_multiplier` (each also "auto") apply to
a base learning rate of `BASE_LEARNING_RATE`. Quiver also accepts, in the same object, the
`quiver train` settings in `EXTRA_KEYS` (e.g. `learning_rate`, `lora_rank`, `max_steps`).
Every value is checked by building the `TrainConfig` the job will run, so a bad value is
refused when the job is created, not minutes later in the child process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.errors import InvalidRequestError

BASE_LEARNING_RATE = 2e-4
AUTO: dict[str, Any] = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
# key -> (TrainConfig field, accepted Python types)
EXTRA_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "learning_rate": ("learning_rate", (int, float)),
    "max_steps": ("max_steps", (int,)),
    "lr_scheduler": ("lr_scheduler", (str,)),
    "warmup_ratio": ("warmup_ratio", (int, float)),
    "weight_decay": ("weight_decay", (int, float)),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", (int,)),
    "max_length": ("max_length", (int,)),
    "lora_rank": ("lora_rank", (int,)),
    "lora_alpha": ("lora_alpha", (int, float)),
    "lora_dropout": ("lora_dropout", (int, float)),
    "target_modules": ("target_modules", (list,)),
    "use_rslora": ("use_rslora", (bool,)),
    "use_dora": ("use_dora", (bool,)),
    "gradient_checkpointing": ("gradient_checkpointing", (bool,)),
    "save_steps": ("save_steps", (int,)),
    "save_total_limit": ("save_total_limit", (int,)),
    "eval_steps": ("eval_steps", (int,)),
    "quantize": ("quantize", (str,)),
    "neftune_alpha": ("neftune_alpha", (int, float)),
    "packing": ("packing", (bool,)),
    "truncate": ("truncate", (bool,)),
    "val_split": ("val_split", (int, float)),
    "early_stopping_patience": ("early_stopping_patience", (int,)),
    "report_to": ("report_to", (str,)),
    "merge": ("merge_to", (bool,)),
}
# A job's merged model (hyperparameter `merge`) is written here, inside its output directory.
MERGED_DIR = "merged"


def merge_hyperparameters(hyperparameters: dict[str, Any] | None, method: dict[str, Any] | None) -> dict[str, Any]:
    """One hyperparameter object from the deprecated top-level field and `method.supervised`."""
    merged = dict(hyperparameters or {})
    if method:
        kind = method.get("type")
        if kind != "supervised":
            raise InvalidRequestError(f"method.type {kind!r} is not supported; Quiver runs 'supervised' "
                                      "fine-tuning only", param="method.type")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise InvalidRequestError("method.supervised must be an object", param="method.supervised")
        inner = supervised.get("hyperparameters") or {}
        if not isinstance(inner, dict):
            raise InvalidRequestError("method.supervised.hyperparameters must be an object",
                                      param="method.supervised.hyperparameters")
        merged.update(inner)
    return merged


def resolve_hyperparameters(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with "auto" replaced and every value checked; the job records and reports this."""
    unknown = sorted(set(raw) - set(AUTO) - set(EXTRA_KEYS))
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameter(s) {unknown}; expected some of "
                                  f"{sorted([*AUTO, *EXTRA_KEYS])}", param=f"hyperparameters.{unknown[0]}")
    resolved: dict[str, Any] = {}
    for key, default in AUTO.items():
        value = raw.get(key, "auto")
        resolved[key] = default if value in ("auto", None) else value
    _check_type("n_epochs", resolved["n_epochs"], (int,))
    _check_type("batch_size", resolved["batch_size"], (int,))
    _check_type("learning_rate_multiplier", resolved["learning_rate_multiplier"], (int, float))
    multiplier = float(resolved["learning_rate_multiplier"])
    if not (math.isfinite(multiplier) and multiplier > 0):
        raise InvalidRequestError(f"learning_rate_multiplier must be positive, got {multiplier!r}",
                                  param="hyperparameters.learning_rate_multiplier")
    for key, (_, types) in EXTRA_KEYS.items():
        if key in raw and raw[key] is not None:
            _check_type(key, raw[key], types)
            resolved[key] = raw[key]
    config = train_config(resolved, model="-", data=Path("-"), output=Path("-"))  # raises on a bad value
    _check_machine(config)
    return resolved


def _check_machine(config: TrainConfig) -> None:
    # What this server's machine cannot run is refused now, not when the child starts.
    from training.preflight import check_quantize, check_report_to

    for check, key in ((check_quantize, "quantize"), (check_report_to, "report_to")):
        try:
            check(config)
        except ValueError as exc:
            raise InvalidRequestError(f"hyperparameters.{key}: {exc}", param=f"hyperparameters.{key}") from None


def train_config(hp: dict[str, Any], *, model: str, data: Path, output: Path,
                 validation_data: Path | None = None, seed: int = 42, name: str | None = None) -> TrainConfig:
    """The run a job with resolved hyperparameters `hp` performs."""
    kwargs: dict[str, Any] = {
        "epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
        "learning_rate": hp.get("learning_rate", BASE_LEARNING_RATE * float(hp["learning_rate_multiplier"])),
    }
    for key, (field, _) in EXTRA_KEYS.items():
        if key in hp and key not in ("learning_rate", "merge"):
            kwargs[field] = tuple(hp[key]) if key == "target_modules" else hp[key]
    if hp.get("merge"):
        kwargs["merge_to"] = output / MERGED_DIR
    try:
        return TrainConfig(model=model, data=data, output=output, validation_data=validation_data,
                           seed=seed, experiment_name=name, **kwargs)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid hyperparameters: {exc}", param="hyperparameters") from None


def cli_arguments(config: TrainConfig) -> list[str]:
    """`python -m training` flags reproducing `config`."""
    args = ["--model", config.model, "--data", str(config.data), "--output", str(config.output),
            "--seed", str(config.seed), "--epochs", str(config.epochs), "--batch-size", str(config.batch_size),
            "--learning-rate", repr(config.learning_rate), "--max-steps", str(config.max_steps),
            "--lr-scheduler", config.lr_scheduler, "--warmup-ratio", repr(config.warmup_ratio),
            "--weight-decay", repr(config.weight_decay),
            "--gradient-accumulation-steps", str(config.gradient_accumulation_steps),
            "--max-length", str(config.max_length), "--lora-rank", str(config.lora_rank),
            "--lora-alpha", repr(config.lora_alpha), "--lora-dropout", repr(config.lora_dropout),
            "--target-modules", ",".join(config.target_modules), "--save-steps", str(config.save_steps),
            "--save-total-limit", str(config.save_total_limit), "--eval-steps", str(config.eval_steps)]
    if config.validation_data is not None:
        args += ["--validation-data", str(config.validation_data)]
    if config.experiment_name:
        args += ["--name", config.experiment_name]
    if config.use_rslora:
        args.append("--use-rslora")
    if config.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    if config.quantize is not None:
        args += ["--quantize", config.quantize]
    if config.neftune_alpha:
        args += ["--neftune-alpha", repr(config.neftune_alpha)]
    if config.val_split:
        args += ["--val-split", repr(config.val_split)]
    if config.early_stopping_patience:
        args += ["--early-stopping-patience", str(config.early_stopping_patience)]
    if config.report_to != "none":
        args += ["--report-to", config.report_to]
    if config.merge_to is not None:
        args += ["--merge-to", str(config.merge_to)]
    args += [flag for flag, on in (("--packing", config.packing), ("--truncate", config.truncate)) if on]
    return args


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> None:
    # JSON true/false are bools, which Python also counts as ints: only accept them where asked for.
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if key == "target_modules" and ok:
        ok = bool(value) and all(isinstance(v, str) and v for v in value)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        raise InvalidRequestError(f"hyperparameters.{key} must be {expected}, got {value!r}",
                                  param=f"hyperparameters.{key}")
