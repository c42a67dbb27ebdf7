"""`quiver train` / `python -m training`: fine-tune a LoRA adapter on JSONL data.

Exit status: 0 trained, 2 bad options or bad data (nothing trained), 1 training failed,
130 interrupted. Failures are also written to the events file as an `error` event, which is
how the job runner learns why a run stopped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.checkpoints import CHECKPOINTS_DIR, has_adapter
from training.config import (
    ALL_LINEAR,
    DEFAULT_TARGETS,
    DEVICES,
    DTYPES,
    LR_SCHEDULERS,
    QUANTIZE,
    REPORT_TO,
    TrainConfig,
)
from training.data import DataError
from training.events import EVENTS_NAME, PLOT_NAME, EventLog
from training.run_guard import OutputBusy, die_with_parent_from_env, hold_output

_DEFAULTS = TrainConfig(model="-", data=Path("-"), output=Path("-"))


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on a `quiver` subparsers object (its `func` is `run_train`)."""
    parser = subparsers.add_parser(
        "train", help="Fine-tune a LoRA adapter the server can load.", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    io = parser.add_argument_group("data and output")
    io.add_argument("--model", required=True, help="Base model: a local directory or a Hugging Face hub id.")
    io.add_argument("--data", required=True, type=Path,
                    help='Training JSONL: {"messages": [...]} chats (loss on assistant turns) or {"text": ...}.')
    io.add_argument("--validation-data", type=Path, default=None, help="Validation JSONL, same formats.")
    io.add_argument("--output", "-o", required=True, type=Path,
                    help="Directory for the adapter, its checkpoints, events.jsonl and loss.png.")
    io.add_argument("--name", "--experiment-name", dest="experiment_name", default=None,
                    help="Experiment name for events, metadata and the plot (default: the output directory's).")
    io.add_argument("--overwrite", action="store_true", help="Replace an adapter already in --output.")
    io.add_argument("--events-file", type=Path, default=None, help=f"Events JSONL (default: OUTPUT/{EVENTS_NAME}).")
    io.add_argument("--validate-only", action="store_true",
                    help="Check and tokenize the data, report, and exit without training.")
    io.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="Show a progress bar (default: when stderr is a terminal).")

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=d.epochs, help="Passes over the training data.")
    opt.add_argument("--max-steps", type=int, default=d.max_steps, help="Optimizer steps; 0: set by --epochs.")
    opt.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate, help="Peak learning rate.")
    opt.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler, help="Schedule after warm-up.")
    opt.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="Fraction of steps warming up.")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay.")
    opt.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="Gradient clipping; 0: off.")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="Examples per micro-batch.")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
                     help="Micro-batches per optimizer step.")
    opt.add_argument("--max-length", type=int, default=d.max_length,
                     help="Longest example in tokens; longer ones are errors unless --truncate.")
    opt.add_argument("--truncate", action="store_true",
                     help="Cut examples longer than --max-length to their first --max-length tokens.")
    opt.add_argument("--packing", action="store_true",
                     help="Pack examples into sequences of --max-length (positions restart and attention "
                          "stays within each example).")
    opt.add_argument("--neftune-alpha", type=float, default=d.neftune_alpha,
                     help="NEFTune: uniform noise of scale alpha/sqrt(L*d) on input embeddings while "
                          "training (5 is common); 0: off.")
    opt.add_argument("--quantize", choices=QUANTIZE, default=None,
                     help="QLoRA: load the frozen base in 4 or 8 bits with bitsandbytes (CUDA only).")
    opt.add_argument("--seed", type=int, default=d.seed, help="Seed for LoRA init, shuffling and dropout.")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="Trade compute for activation memory.")
    opt.add_argument("--device", default=d.device, help=f"One of {list(DEVICES)} or cuda:N.")
    opt.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                     help="Base weights: auto is float32 on CPU, bfloat16 on CUDA.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", "-r", type=int, default=d.lora_rank, help="Rank r.")
    lora.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="Alpha (scaling alpha/r).")
    lora.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="Dropout on the LoRA input.")
    lora.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS),
                      help="Comma-separated module names to adapt, or all-linear (every linear layer "
                           "but the output head).")
    lora.add_argument("--use-rslora", action="store_true", help="Rank-stabilised scaling alpha/sqrt(r).")
    lora.add_argument("--use-dora", action="store_true",
                      help="Train DoRA (weight-decomposed LoRA); served like LoRA (not yet under "
                           "tensor parallelism).")

    ckpt = parser.add_argument_group("checkpoints, evaluation and logging")
    ckpt.add_argument("--save-steps", type=int, default=d.save_steps,
                      help="Checkpoint every N steps; 0: at the end of each epoch.")
    ckpt.add_argument("--save-total-limit", "--keep-checkpoints", dest="save_total_limit", type=int,
                      default=d.save_total_limit, help="Checkpoints kept (newest); 0: none.")
    ckpt.add_argument("--eval-steps", type=int, default=d.eval_steps,
                      help="Validation loss every N steps; 0: at each checkpoint.")
    ckpt.add_argument("--logging-steps", type=int, default=d.logging_steps, help="Metrics event every N steps.")
    ckpt.add_argument("--val-split", type=float, default=d.val_split,
                      help="Hold out this fraction of the training examples for validation; 0: none.")
    ckpt.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience,
                      help="Stop after N evaluations without a lower validation loss; 0: off.")
    ckpt.add_argument("--resume-from", type=Path, default=None,
                      help="Continue from a checkpoint directory (OUTPUT/checkpoints/ckpt-<step>) of a run "
                           "with the same settings: weights, optimizer, scheduler and step.")
    ckpt.add_argument("--report-to", choices=REPORT_TO, default=d.report_to,
                      help="Also log scalars to TensorBoard (OUTPUT/runs).")
    ckpt.add_argument("--merge-to", type=Path, default=None,
                      help="After training, save the base with the adapter merged in (a full model) here.")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    targets = tuple(t.strip() for t in str(args.target_modules).split(",") if t.strip())
    return TrainConfig(
        model=args.model, data=args.data, output=args.output, validation_data=args.validation_data,
        experiment_name=args.experiment_name, epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, use_rslora=args.use_rslora, use_dora=args.use_dora,
        gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, eval_steps=args.eval_steps, logging_steps=args.logging_steps,
        device=args.device, dtype=args.dtype, quantize=args.quantize, neftune_alpha=args.neftune_alpha,
        packing=args.packing, truncate=args.truncate, val_split=args.val_split,
        early_stopping_patience=args.early_stopping_patience, resume_from=args.resume_from,
        report_to=args.report_to, merge_to=args.merge_to,
    )


def run_train(args: argparse.Namespace) -> int:
    from training.preflight import check_before_loading

    try:
        config = config_from_args(args)
        check_before_loading(config)  # quantization, tensorboard, checkpoint, target names: nothing loaded yet
    except (ValueError, OSError) as exc:
        return _fail(f"error: {exc}", 2)
    _warn_unservable(config)
    die_with_parent_from_env()
    if args.validate_only:
        return _validate_only(config)
    if config.output.exists() and not config.output.is_dir():
        return _fail(f"error: --output {str(config.output)!r} exists and is not a directory", 2)
    try:
        with hold_output(config.output):  # one run per output directory, for as long as this process lives
            return _run_holding_output(config, args)
    except OutputBusy as exc:
        return _fail(f"error: {exc}", 2)


def _run_holding_output(config: TrainConfig, args: argparse.Namespace) -> int:
    try:
        _prepare_output(config.output, args.overwrite, continuing=_resumes_in(config))
    except ValueError as exc:
        return _fail(f"error: {exc}", 2)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    events_path = args.events_file or config.output / EVENTS_NAME
    with EventLog(events_path, listener=None if progress else _print_event) as events:
        return _train_logged(config, events, progress)


def _train_logged(config: TrainConfig, events: EventLog, progress: bool) -> int:
    from transformers.utils import logging as transformers_logging

    from training.trainer import train

    if not progress:
        transformers_logging.disable_progress_bar()  # no weight-loading bars in logs either

    try:
        result = train(config, events, progress=progress)
    except DataError as exc:
        code = "invalid_validation_file" if exc.param == "validation_file" else "invalid_training_file"
        events.error(str(exc), code=code, param=exc.param)
        return _fail(f"bad data, nothing trained:\n{exc}", 2)
    except KeyboardInterrupt:
        events.error("training was interrupted", code="interrupted")
        return _fail("interrupted", 130)
    except Exception as exc:
        events.error(f"{type(exc).__name__}: {exc}", code="training_error")
        traceback.print_exc()
        return _fail(f"training failed: {type(exc).__name__}: {exc}", 1)
    loss = result.metrics.get("train_loss")
    valid = result.metrics.get("valid_loss")
    print(f"adapter: {result.output} ({result.steps} steps, {result.trained_tokens} tokens"
          + (f", train loss {loss:.4f}" if loss is not None else "")
          + (f", validation loss {valid:.4f}" if valid is not None else "") + ")")
    if result.plot is not None:
        print(f"loss curve: {result.plot}")
    for step, path in result.checkpoints:
        print(f"checkpoint {step}: {path}")
    return 0


def _validate_only(config: TrainConfig) -> int:
    from transformers import AutoTokenizer

    from training.trainer import effective_max_length, load_data

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        load_data(config, tokenizer, effective_max_length(config), EventLog(None, listener=_print_event))
    except DataError as exc:
        return _fail(f"bad data:\n{exc}", 2)
    print("data OK")
    return 0


def _warn_unservable(config: TrainConfig) -> None:
    from adapters.peft_format import SUPPORTED_TARGETS

    targets = config.target_modules
    if targets == (ALL_LINEAR,):
        from training.preflight import linear_module_names

        targets = tuple(linear_module_names(config.model))
    others = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if others:
        print(f"warning: the Quiver server serves LoRA on {list(SUPPORTED_TARGETS)} only; "
              f"an adapter on {others} will be refused", file=sys.stderr)


def _resumes_in(config: TrainConfig) -> bool:
    """True when --resume-from is a checkpoint of the run in --output, which then carries on there."""
    return config.resume_from is not None and config.output.resolve() in config.resume_from.resolve().parents


def _prepare_output(output: Path, overwrite: bool, continuing: bool = False) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is not a directory")
    if continuing:
        return  # its events, checkpoints and adapter are carried on, not replaced
    leftovers = [p for p in (output / EVENTS_NAME, output / CHECKPOINTS_DIR, output / PLOT_NAME) if p.exists()]
    if has_adapter(output) or leftovers:
        if not overwrite:
            raise ValueError(f"--output {str(output)!r} already holds a training run; "
                             "pick another directory or pass --overwrite")
        for path in leftovers:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _print_event(event: dict[str, Any]) -> None:
    kind = event.get("type")
    if kind == "metrics":
        text = f"step {event['step']}/{event['total_steps']}  loss {_num(event.get('train_loss'))}"
        if event.get("valid_loss") is not None:
            text += f"  valid {_num(event['valid_loss'])}"
        print(f"{text}  lr {event.get('learning_rate', 0):.2e}  {event.get('elapsed_s', 0):.1f}s", flush=True)
    elif kind == "message":
        print(event["message"], flush=True)
    elif kind == "checkpoint":
        print(f"checkpoint at step {event['step']}: {event['path']}", flush=True)


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _fail(message: str, status: int) -> int:
    print(f"quiver train: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quiver train", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
