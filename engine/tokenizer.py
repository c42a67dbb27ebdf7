"""Tokenizer loading and end-of-sequence ids, from a model directory."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model directory's own tokenizer; remote code is never run."""
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def eos_token_ids(model_dir: Path, hf_config, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends generation: config, generation_config.json and the tokenizer's EOS."""
    ids: set[int] = set()
    ids.update(_as_ids(getattr(hf_config, "eos_token_id", None)))
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        ids.update(_as_ids(json.loads(gen_path.read_text()).get("eos_token_id")))
    ids.update(_as_ids(tokenizer.eos_token_id))
    return ids


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
