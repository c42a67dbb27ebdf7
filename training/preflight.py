"""Checks of a run's settings against this machine and the base model, before anything loads.

Each raises ValueError with the reason; `quiver train` exits 2 on it, having loaded no
weights and no tokenizer. Quantization needs CUDA and bitsandbytes; target module names
are compared with the model's own, read from a weightless (meta-device) copy of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from training.config import ALL_LINEAR, TrainConfig

TRAINER_STATE_NAME = "trainer_state.pt"


def check_before_loading(config: TrainConfig) -> None:
    check_quantize(config)
    check_report_to(config)
    check_resume(config)
    check_target_modules(config)


def check_quantize(config: TrainConfig) -> None:
    if config.quantize is None:
        return
    flag = f"--quantize {config.quantize}"
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} needs a CUDA GPU (bitsandbytes quantizes on the GPU), and none is available; "
                         "train without --quantize on this machine")
    if config.device != "auto" and not config.device.startswith("cuda"):
        raise ValueError(f"{flag} needs --device cuda, got --device {config.device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} needs bitsandbytes, which is not installed (pip install bitsandbytes)")


def check_report_to(config: TrainConfig) -> None:
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package, which is not installed "
                         "(pip install 'quiver[training]' or pip install tensorboard)")


def check_resume(config: TrainConfig) -> None:
    if config.resume_from is None:
        return
    path = Path(config.resume_from)
    if not path.is_dir():
        raise ValueError(f"--resume-from {str(path)!r} is not a directory")
    missing = [n for n in ("adapter_model.safetensors", TRAINER_STATE_NAME) if not (path / n).is_file()]
    if missing:
        raise ValueError(f"--resume-from {str(path)!r} is not a training checkpoint (missing {missing}); "
                         "pass a checkpoints/ckpt-<step> directory of a run")


def linear_module_names(model_name: str) -> list[str]:
    """Distinct last name components of the model's linear layers, output head excluded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_name))
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def check_target_modules(config: TrainConfig) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.target_modules == (ALL_LINEAR,):
        return
    try:
        model_config = AutoConfig.from_pretrained(config.model)
    except Exception:
        return  # no model to compare with: loading it reports that, as a training error with its events
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise ValueError(f"--target-modules {unknown} name no module of {config.model}; its linear layers are "
                         f"{linear_module_names(config.model)} (or pass {ALL_LINEAR!r})")
