"""load_tests/model_dir.py: a config-only model directory whose tokenizer covers the whole vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from load_tests.model_dir import SPECIALS, write_model_dir
from server.cli import build_parser, engine_config


def test_model_dir_has_shape_and_full_vocab_tokenizer(tmp_path: Path) -> None:
    out = write_model_dir(tmp_path / "m", "llama-1b", num_layers=2)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 2048 and config["num_hidden_layers"] == 2
    assert not list(out.glob("*.safetensors"))  # served with --load-format dummy
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == config["vocab_size"] == 128256
    assert tok.eos_token_id == config["eos_token_id"] == SPECIALS.index("</s>")
    # Every id decodes (the model samples any of them), and English prompts get distinct ids.
    assert tok.decode([config["vocab_size"] - 1]) == f"w{config['vocab_size'] - 1}"
    a, b = tok("What is a quiver?").input_ids, tok("How do birds fly?").input_ids
    assert a != b and tok.unk_token_id not in a + b
    chat = tok.apply_chat_template([{"role": "user", "content": "What is a quiver?"}], add_generation_prompt=True)
    ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert tok.unk_token_id not in ids


def test_serve_load_format_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", "--model", "/m", "--load-format", "dummy"])
    assert engine_config(args, "/m").load_format == "dummy"
    args = build_parser().parse_args(["serve", "--model", "/m"])
    assert engine_config(args, "/m").load_format == "auto"
