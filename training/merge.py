"""Merge a trained adapter into its base model and save a full model transformers loads as is.

The base is reloaded unquantized in the training dtype (float32 on CPU), so a QLoRA run's
adapter is merged into real weights rather than into 4-bit ones; the tokenizer is saved beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def merge_adapter(base_model: str, adapter_dir: Path, target: Path, dtype: torch.dtype = torch.float32) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(target)
    return target
