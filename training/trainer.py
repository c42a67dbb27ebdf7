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

from training.batching import Batches, evaluate, pack_examples, token_loss
from training.checkpoints import prune_checkpoints, save_adapter, save_checkpoint
from training.config import ALL_LINEAR, TrainConfig
from training.data import file_sha256, read_records
from training.encoding import Example, encode_records
from training.events import PLOT_NAME, EventLog, plot_losses
from training.preflight import TRAINER_STATE_NAME

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
    max_length = effective_max_length(config)
    data = load_data(config, tokenizer, max_length, events)
    device, dtype = _device_and_dtype(config)
    model = _build_model(config, device, dtype)
    if config.neftune_alpha:
        from training.neftune import add_neftune_hook

        add_neftune_hook(model, config.neftune_alpha)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = data.train
    if config.packing:
        train_set = pack_examples(data.train, max_length)
        events.message(f"packed {len(data.train)} examples into {len(train_set)} sequences of up to "
                       f"{max_length} tokens")
    batches = Batches(train_set, config.batch_size, config.gradient_accumulation_steps, config.seed, pad_id or 0)
    total = config.max_steps or batches.steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = _scheduler(config, optimizer, total)
    events.message(f"Training {config.name}: {total} steps, {_count_trainable(model):,} trainable parameters, "
                   f"on {device.type} ({str(dtype).removeprefix('torch.')})")
    loop = _Loop(config, model, optimizer, scheduler, batches, data, total, device, events, pad_id or 0)
    if config.resume_from is not None:
        loop.resume(config.resume_from)
    tokens_before, loop_started = loop.tokens, time.monotonic()
    try:
        metrics = loop.run(progress, started)
    finally:
        loop.close()
    speed = _throughput(loop.tokens - tokens_before, loop_started, device)
    final_meta = loop.metadata(loop.step, metrics)
    save_adapter(model, config.output, final_meta)
    plot = _plot(events, config)
    if config.merge_to is not None:
        from training.merge import merge_adapter

        merged = merge_adapter(config.model, config.output, config.merge_to, dtype)
        events.message(f"merged model (base with the adapter folded in): {merged}")
    events.emit("done", step=loop.step, path=str(config.output), metrics=metrics, trained_tokens=loop.tokens,
                elapsed_s=round(time.monotonic() - started, 2), **speed)
    return TrainResult(config.output, loop.step, loop.tokens, metrics, loop.kept, plot)


def _throughput(tokens: int, since: float, device: torch.device) -> dict[str, float | None]:
    """The training loop's own speed (no loading, saving or merging) and the process's peak GPU memory.

    What sizing a run needs: tokens per second to budget its time, the peak (weights, optimizer,
    activations, logits) to pick a card. Peak memory is None on a CPU, where torch does not count it.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last optimizer step may still be running
    seconds = time.monotonic() - since
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"train_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory_gb": None if peak is None else round(peak, 3)}


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
        examples = encode_records(records, tokenizer, max_length, path.name, param=param, truncate=config.truncate)
        tokens = sum(len(e.input_ids) for e in examples)
        trained = sum(e.num_trained for e in examples)
        info[key] = {"path": str(path), "sha256": file_sha256(path), "examples": len(examples),
                     "tokens": tokens, "trained_tokens": trained}
        sets[key] = examples
        events.message(f"{key} data {path.name}: {len(examples)} examples, {tokens} tokens "
                       f"({trained} learned)")
    if config.val_split:
        sets["train"], sets["validation"] = split_validation(sets["train"], config.val_split, config.seed)
        info["validation"] = {"split_from": "train", "fraction": config.val_split,
                              "examples": len(sets["validation"])}
        info["train"]["examples"] = len(sets["train"])
        events.message(f"held out {len(sets['validation'])} of the training examples for validation "
                       f"(--val-split {config.val_split})")
    return _Data(sets["train"], sets["validation"], info)


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` (at least one) held out; both non-empty."""
    if len(examples) < 2:
        raise ValueError(f"--val-split needs at least 2 training examples, the data has {len(examples)}")
    held = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    valid = set(order[:held])
    return ([e for i, e in enumerate(examples) if i not in valid], [e for i, e in enumerate(examples) if i in valid])


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

    if config.quantize is not None:
        model = _load_quantized(config, device, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device)
    if config.gradient_checkpointing and config.quantize is None:
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=ALL_LINEAR if config.target_modules == (ALL_LINEAR,) else list(config.target_modules),
        use_rslora=config.use_rslora, use_dora=config.use_dora,
        bias="none", task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (the default) keeps LoRA weights float32 under a bf16 base.
    with warnings.catch_warnings():
        # peft asks transformers a question transformers has renamed: noise for our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = config.model
    return peft_model


def _load_quantized(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """QLoRA: the frozen base in 4-bit NF4 (double-quantized) or 8-bit, computing in `dtype`."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if config.quantize == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device.index or 0})
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


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
        self.step = 0  # optimizer steps taken, counting those of a run resumed from
        self.best_valid: float | None = None
        self.evals_without_gain = 0
        self.kept: list[tuple[int, Path]] = []
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scalars = _tensorboard(config, events)

    def resume(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: its adapter weights, optimizer and scheduler state, step and RNG."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(Path(checkpoint) / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, weights)
        state = torch.load(Path(checkpoint) / TRAINER_STATE_NAME, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_valid, self.evals_without_gain = state.get("best_valid"), int(state.get("evals_without_gain", 0))
        if self.step >= self.total:
            raise ValueError(f"--resume-from {str(checkpoint)!r} is at step {self.step}, and this run has "
                             f"{self.total} steps: nothing left to train")
        self.events.message(f"resumed from {checkpoint} at step {self.step}/{self.total}")

    def _save_state(self, directory: Path) -> None:
        state = {"step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                 "best_valid": self.best_valid, "evals_without_gain": self.evals_without_gain}
        staging = directory / f".{TRAINER_STATE_NAME}.tmp"
        torch.save(state, staging)
        staging.replace(directory / TRAINER_STATE_NAME)

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()

    def run(self, progress: bool, started: float) -> dict[str, float | None]:
        from tqdm.auto import tqdm

        metrics: dict[str, float | None] = {"train_loss": None, "valid_loss": None}
        bar = tqdm(total=self.total, disable=not progress, unit="step", dynamic_ncols=True,
                   desc=self.config.name)
        self.model.train()
        bar.update(self.step)
        steps = self.batches.steps(self.total, start=self.step)
        try:
            for step, group in enumerate(steps, start=self.step + 1):
                self.step = step
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
                    self._scalars(step, loss, lr, evaluated)
                stop = evaluated is not None and self._no_gain(step, evaluated["valid_loss"])
                if self._is_checkpoint_step(step) or stop:
                    self._checkpoint(step, metrics)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if stop:
                    self.events.message(
                        f"early stopping at step {step}/{self.total}: validation loss has not improved on "
                        f"{self.best_valid:.4f} for {self.evals_without_gain} evaluations")
                    break
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

    def _no_gain(self, step: int, valid_loss: float) -> bool:
        """Record an evaluation (a `val_loss` event); True when early stopping's patience has run out."""
        self.events.emit("val_loss", step=step, epoch=round(step / self.batches.steps_per_epoch, 4),
                         val_loss=valid_loss)
        if self.best_valid is None or valid_loss < self.best_valid:
            self.best_valid, self.evals_without_gain = valid_loss, 0
        else:
            self.evals_without_gain += 1
        patience = self.config.early_stopping_patience
        return bool(patience) and self.evals_without_gain >= patience and step < self.total

    def _scalars(self, step: int, loss: float, lr: float, evaluated: dict[str, float] | None) -> None:
        if self.scalars is None:
            return
        self.scalars.add_scalar("train/loss", loss, step)
        self.scalars.add_scalar("train/learning_rate", lr, step)
        for key, value in (evaluated or {}).items():
            self.scalars.add_scalar(f"eval/{key.removeprefix('valid_')}", value, step)
        self.scalars.flush()

    def _is_checkpoint_step(self, step: int) -> bool:
        if step == self.total:
            return True
        if self.config.save_steps:
            return step % self.config.save_steps == 0
        return step % self.batches.steps_per_epoch == 0

    def _evaluate(self, step: int) -> dict[str, float] | None:
        if not self.data.valid:
            return None
        end_of_epoch = step % self.batches.steps_per_epoch == 0
        due = (step % self.config.eval_steps == 0 if self.config.eval_steps
               else self._is_checkpoint_step(step) or end_of_epoch)
        if not due and step != self.total:
            return None
        loss, accuracy = evaluate(self.model, self.data.valid, self.config.batch_size, self.pad_id, self.device)
        return {"valid_loss": loss, "valid_mean_token_accuracy": accuracy}

    def _checkpoint(self, step: int, metrics: dict[str, float | None]) -> None:
        if self.config.save_total_limit == 0:
            return
        path = save_checkpoint(self.model, self.config.output, step, self.metadata(step, metrics),
                               )
        self._save_state(path)
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


def _tensorboard(config: TrainConfig, events: EventLog) -> Any:
    if config.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter  # checked by preflight: tensorboard is installed

    logdir = config.output / "runs"
    events.message(f"TensorBoard scalars in {logdir} (tensorboard --logdir {logdir})")
    return SummaryWriter(log_dir=str(logdir))
