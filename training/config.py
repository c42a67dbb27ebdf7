"""One training run's settings: a dataclass validated where a user can set it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The projections the server can serve (adapters.peft_format.SUPPORTED_TARGETS), Llama naming.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULERS: tuple[str, ...] = ("cosine", "linear", "constant", "constant_with_warmup")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
ALL_LINEAR = "all-linear"  # PEFT's keyword: every linear layer but the output head
QUANTIZE: tuple[str, ...] = ("4bit", "8bit")
REPORT_TO: tuple[str, ...] = ("none", "tensorboard")


@dataclass
class TrainConfig:
    """What to train, on what, and how.

    max_steps:        optimizer steps; 0 lets `epochs` decide.
    save_steps:       checkpoint every N optimizer steps; 0 checkpoints at the end of each epoch.
    save_total_limit: checkpoints kept on disk (the newest); 0 keeps none, the final adapter always stays.
    eval_steps:       validation loss every N steps; 0 evaluates when a checkpoint is saved.
    dtype:            auto is float32 on CPU and bfloat16 on CUDA (LoRA weights stay float32).
    quantize:         QLoRA: the frozen base loaded in 4 or 8 bits by bitsandbytes (CUDA only).
    neftune_alpha:    NEFTune noise scale on the input embeddings while training; 0 is off.
    packing:          several examples per sequence of max_length, attention kept within each.
    truncate:         cut long examples to max_length instead of refusing them.
    val_split:        fraction of the training examples held out for validation; 0 is none.
    early_stopping_patience: stop after N evaluations without a better validation loss; 0 is off.
    resume_from:      a checkpoint directory of an earlier run to continue from.
    merge_to:         after training, a full model (base with the adapter merged) is saved here.
    """

    model: str
    data: Path
    output: Path
    validation_data: Path | None = None
    experiment_name: str | None = None
    epochs: int = 3
    max_steps: int = 0
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    seed: int = 42
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    use_dora: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 0
    save_total_limit: int = 3
    eval_steps: int = 0
    logging_steps: int = 1
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    neftune_alpha: float = 0.0
    packing: bool = False
    truncate: bool = False
    val_split: float = 0.0
    early_stopping_patience: int = 0
    resume_from: Path | None = None
    report_to: str = "none"
    merge_to: Path | None = None

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = Path(self.output)
        if self.validation_data is not None:
            self.validation_data = Path(self.validation_data)
        if self.resume_from is not None:
            self.resume_from = Path(self.resume_from)
        if self.merge_to is not None:
            self.merge_to = Path(self.merge_to)
        if not str(self.model).strip():
            raise ValueError("model must name a local directory or a hub id")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        _positive(self, "epochs", "batch_size", "gradient_accumulation_steps", "max_length", "lora_rank",
                  "logging_steps")
        _non_negative(self, "max_steps", "save_steps", "save_total_limit", "eval_steps")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        _choice(self, "lr_scheduler", LR_SCHEDULERS)
        _choice(self, "device", DEVICES, prefix_ok="cuda:")
        _choice(self, "dtype", DTYPES)
        self._check_extras()

    def _check_extras(self) -> None:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"target_modules: {ALL_LINEAR!r} stands alone, got {list(self.target_modules)}")
        if self.quantize is not None:
            _choice(self, "quantize", QUANTIZE)
        _choice(self, "report_to", REPORT_TO)
        if isinstance(self.neftune_alpha, bool) or not (math.isfinite(self.neftune_alpha)
                                                        and self.neftune_alpha >= 0):
            raise ValueError(f"neftune_alpha must be a number >= 0 (0 is off), got {self.neftune_alpha!r}")
        if isinstance(self.val_split, bool) or not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"val_split must be a fraction in [0, 1), got {self.val_split!r}")
        if self.val_split and self.validation_data is not None:
            raise ValueError("val_split and validation_data both name a validation set; pick one")
        _non_negative(self, "early_stopping_patience")
        if self.early_stopping_patience and not (self.val_split or self.validation_data is not None):
            raise ValueError("early_stopping_patience needs a validation set (val_split or validation_data)")
        for name in ("packing", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def name(self) -> str:
        """The experiment's name: as given, else the output directory's."""
        return self.experiment_name or self.output.resolve().name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings), recorded next to every adapter."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...], prefix_ok: str | None = None) -> None:
    value = getattr(config, name)
    if value in choices or (prefix_ok and isinstance(value, str) and value.startswith(prefix_ok)):
        return
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
