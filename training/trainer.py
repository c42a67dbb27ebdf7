"""The training loop: LoRA (or DoRA) with peft on a transformers causal LM.

A small explicit loop rather than `transformers.Trainer`: it starts in well under a second
on a CPU (no accelerate set-up), normalises the loss over every assigned token of an
accumulated step (what a big batch would compute, whatever the padding), and writes its
own events and checkpoints as plain PEFT directories the server loads as they are, with
no pickled optimizer state beside them. The data is checked and tokenized before the
model is loaded, so bad data fails in seconds, with line numbers.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.batching import Batches, evaluate, token_loss
from training.checkpoints import prune_checkpoints, save_adapter, save_checkpoint
from training.config import TrainConfig
from training.data import file_sha256, read_records
from training.encoding import Example, encode_records
from training.events import PLOT_NAME, EventLog, plot_losses

METADATA_FORMAT = "quiver-training/1"


@dataclass
class TrainResult:
    output: Path
    steps: int
    trained_tokens: int
    metrics: dict[str, float | None]
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    plot: Path | None = None


@dataclass
class _Data:
    train: list[Example]
    valid: list[Example]
    info: dict[str, Any]


def train(config: TrainConfig, events: EventLog, progress: bool = False) -> TrainResult:
    """Run `config` to completion; raises DataError on bad data before loading the model."""
    from transformers import AutoTokenizer, set_seed

    started = time.monotonic()
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    data = load_data(config, tokenizer, effective_max_length(config), events)
    device, dtype = _device_and_dtype(config)
    model = _build_model(config, device, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = Batches(data.train, config.batch_size, config.gradient_accumulation_steps, config.seed, pad_id or 0)
    total = config.max_steps or batches.steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = _scheduler(config, optimizer, total)
    events.message(f"Training {config.name}: {total} steps, {_count_trainable(model):,} trainable parameters, "
                   f"on {device.type} ({str(dtype).removeprefix('torch.')})")
    loop = _Loop(config, model, optimizer, scheduler, batches, data, total, device, events, pad_id or 0)
    metrics = loop.run(progress, started)
    final_meta = loop.metadata(total, metrics)
    save_adapter(model, config.output, final_meta, servable=not config.use_dora)
    plot = _plot(events, config)
    events.emit("done", step=total, path=str(config.output), metrics=metrics, trained_tokens=loop.tokens,
                elapsed_s=round(time.monotonic() - started, 2))
    return TrainResult(config.output, total, loop.tokens, metrics, loop.kept, plot)


def _plot(events: EventLog, config: TrainConfig) -> Path | None:
    try:
        return plot_losses(events.events, config.output / PLOT_NAME, f"{config.name} ({config.model})")
    except ImportError:
        # matplotlib comes with the `training` extra; the adapter is worth keeping without a plot.
        events.message("No loss plot: matplotlib is not installed (install quiver[training]).", level="warning")
        return None


def effective_max_length(config: TrainConfig) -> int:
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(config.model), "max_position_embeddings", None)
    return min(config.max_length, limit) if isinstance(limit, int) and limit > 0 else config.max_length


def load_data(config: TrainConfig, tokenizer: Any, max_length: int, events: EventLog) -> _Data:
    info: dict[str, Any] = {}
    sets: dict[str, list[Example]] = {}
    for key, path, param in (("train", config.data, "training_file"),
                             ("validation", config.validation_data, "validation_file")):
        if path is None:
            sets[key], info[key] = [], None
            continue
        records = read_records(path, param=param)
        examples = encode_records(records, tokenizer, max_length, path.name, param=param)
        tokens = sum(len(e.input_ids) for e in examples)
        trained = sum(e.num_trained for e in examples)
        info[key] = {"path": str(path), "sha256": file_sha256(path), "examples": len(examples),
                     "tokens": tokens, "trained_tokens": trained}
        sets[key] = examples
        events.message(f"{key} data {path.name}: {len(examples)} examples, {tokens} tokens "
                       f"({trained} learned)")
    return _Data(sets["train"], sets["validation"], info)


def _device_and_dtype(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} was asked for, but CUDA is not available")
    if config.dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if cuda_bf16 else torch.float32
    return device, getattr(torch, config.dtype)


def _build_model(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), use_rslora=config.use_rslora, use_dora=config.use_dora,
        bias="none", task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (the default) keeps LoRA weights float32 under a bf16 base.
    with warnings.catch_warnings():
        # peft asks transformers a question transformers has renamed: noise for our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = config.model
    return peft_model


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    warmup = math.ceil(config.warmup_ratio * total)
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Loop:
    def __init__(self, config: TrainConfig, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 batches: Batches, data: _Data, total: int, device: torch.device, events: EventLog,
                 pad_id: int) -> None:
        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.batches, self.data, self.total, self.device, self.events = batches, data, total, device, events
        self.pad_id = pad_id
        self.tokens = 0
        self.kept: list[tuple[int, Path]] = []
        self.params = [p for p in model.parameters() if p.requires_grad]

    def run(self, progress: bool, started: float) -> dict[str, float | None]:
        from tqdm.auto import tqdm

        metrics: dict[str, float | None] = {"train_loss": None, "valid_loss": None}
        bar = tqdm(total=self.total, disable=not progress, unit="step", dynamic_ncols=True,
                   desc=self.config.name)
        self.model.train()
        steps = self.batches.steps(self.total)
        try:
            for step, group in enumerate(steps, start=1):
                loss, accuracy = self._optimizer_step(group)
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                metrics = {"train_loss": loss, "train_mean_token_accuracy": accuracy,
                           "valid_loss": metrics.get("valid_loss"),
                           "valid_mean_token_accuracy": metrics.get("valid_mean_token_accuracy")}
                evaluated = self._evaluate(step)
                if evaluated is not None:
                    metrics.update(evaluated)
                if evaluated is not None or step % self.config.logging_steps == 0 or step == self.total:
                    self.events.emit(
                        "metrics", step=step, total_steps=self.total, epoch=round(step / self.batches.steps_per_epoch, 4),
                        train_loss=loss, train_mean_token_accuracy=accuracy, learning_rate=lr,
                        elapsed_s=round(time.monotonic() - started, 3), tokens=self.tokens,
                        **(evaluated or {}),
                    )
                if self._is_checkpoint_step(step):
                    self._checkpoint(step, metrics)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
        finally:
            bar.close()
        return metrics

    def _optimizer_step(self, group: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        assigned = sum(int(mb["num_trained"]) for mb in group)
        loss_sum = correct = 0.0
        for micro in group:
            loss, hits = token_loss(self.model, micro, self.device)
            (loss / max(assigned, 1)).backward()
            loss_sum += float(loss.detach())
            correct += hits
            self.tokens += int(micro["num_tokens"])
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(assigned, 1), correct / max(assigned, 1)

    def _is_checkpoint_step(self, step: int) -> bool:
        if step == self.total:
            return True
        if self.config.save_steps:
            return step % self.config.save_steps == 0
        return step % self.batches.steps_per_epoch == 0

    def _evaluate(self, step: int) -> dict[str, float] | None:
        if not self.data.valid:
            return None
        due = step % self.config.eval_steps == 0 if self.config.eval_steps else self._is_checkpoint_step(step)
        if not due and step != self.total:
            return None
        loss, accuracy = evaluate(self.model, self.data.valid, self.config.batch_size, self.pad_id, self.device)
        return {"valid_loss": loss, "valid_mean_token_accuracy": accuracy}

    def _checkpoint(self, step: int, metrics: dict[str, float | None]) -> None:
        if self.config.save_total_limit == 0:
            return
        path = save_checkpoint(self.model, self.config.output, step, self.metadata(step, metrics),
                               servable=not self.config.use_dora)
        self.events.emit("checkpoint", step=step, path=str(path), metrics={"step": step, **metrics})
        for old_step, old_path in prune_checkpoints(self.config.output, self.config.save_total_limit):
            self.events.emit("checkpoint_removed", step=old_step, path=str(old_path))
        self.kept = [(s, p) for s, p in [*self.kept, (step, path)] if p.exists()]

    def metadata(self, step: int, metrics: dict[str, float | None]) -> dict[str, Any]:
        import peft
        import transformers

        return {
            "format": METADATA_FORMAT,
            "experiment_name": self.config.name,
            "base_model": self.config.model,
            "data": self.data.info,
            "config": self.config.to_dict(),
            "step": step,
            "total_steps": self.total,
            "epoch": round(step / self.batches.steps_per_epoch, 4),
            "metrics": metrics,
            "trained_tokens": self.tokens,
            "created_at": int(time.time()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
        }
