"""`quiver train` end to end on a tiny model: adapter, metadata, events, plot, checkpoints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapters.peft_format import read_adapter_spec
from training.cli import main, run_train
from training.data import file_sha256
from training.events import read_events

WORDS = ["Hello world!", "The quick brown fox.", "Quiver serves adapters.", "Un café au lait.", "Emoji 🎯"]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = [_chat(q, "The lazy dog.") for q in WORDS] * 2 + [{"text": "Quiver serves many LoRA adapters."}]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid = root / "valid.jsonl"
    valid.write_text("".join(json.dumps(_chat(q, "The lazy dog.")) + "\n" for q in WORDS[:2]))
    return {"train": train, "valid": valid}


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--no-progress",
            "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "4", *extra]


def _events(out: Path) -> list[dict]:
    return read_events(out / "events.jsonl")[0]


def test_training_writes_an_adapter_the_engine_serves(tmp_path, model_dir, data, capsys) -> None:
    out = tmp_path / "run"
    rc = main(_args(model_dir, data["train"], out, "--validation-data", str(data["valid"]), "--epochs", "4",
                    "--learning-rate", "1e-2", "--save-total-limit", "2", "--name", "tiny-exp"))
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"adapter: {out}" in printed and "loss curve:" in printed

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert config["base_model_name_or_path"] == str(model_dir)
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["base_model"] == str(model_dir) and meta["experiment_name"] == "tiny-exp"
    assert meta["data"]["train"]["sha256"] == file_sha256(data["train"])
    assert meta["data"]["train"]["examples"] == 11 and meta["data"]["validation"]["examples"] == 2
    assert meta["config"]["lora_rank"] == 4 and meta["step"] == meta["total_steps"] == 12

    events = _events(out)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["step"] for e in metrics] == list(range(1, 13))
    for event in metrics:
        assert {"epoch", "train_loss", "learning_rate", "time", "elapsed_s", "total_steps"} <= set(event)
    losses = [e["train_loss"] for e in metrics]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    valid = [(e["step"], e["valid_loss"]) for e in metrics if "valid_loss" in e]
    assert [s for s, _ in valid] == [3, 6, 9, 12]  # one per epoch, with each checkpoint
    assert valid[-1][1] < valid[0][1]
    assert events[-1]["type"] == "done" and events[-1]["trained_tokens"] > 0
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")

    saved = [e["step"] for e in events if e["type"] == "checkpoint"]
    removed = [e["step"] for e in events if e["type"] == "checkpoint_removed"]
    assert saved == [3, 6, 9, 12] and removed == [3, 6]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["ckpt-12", "ckpt-9"]
    assert json.loads((out / "checkpoints" / "ckpt-9" / "training_metadata.json").read_text())["step"] == 9

    _assert_engine_serves(model_dir, {"final": out, "ckpt-9": out / "checkpoints" / "ckpt-9"})


def _assert_engine_serves(model_dir: Path, adapters: dict[str, Path]) -> None:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=128,
                                    max_lora_rank=8), adapters=adapters)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello world!"}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    names = [None, *adapters]
    for name in names:
        engine.add_request(str(name), ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), name)
    out: dict[str, list[int]] = {str(n): [] for n in names}
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
    assert out["final"] != out["None"]  # the adapter changes what the model says


def test_bad_data_stops_before_training_with_line_numbers(tmp_path, model_dir, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat("q", "a")) + "\n{not json\n"
                   + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "robot", "content": "q"}]}) + "\n")
    out = tmp_path / "run"
    assert main(_args(model_dir, bad, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2: not valid JSON" in err
    assert "bad.jsonl: line 3: no assistant turn" in err
    assert "bad.jsonl: line 4: messages[0] has role 'robot'" in err
    assert not (out / "adapter_config.json").exists()
    (error,) = [e for e in _events(out) if e["type"] == "error"]
    assert error["code"] == "invalid_training_file" and error["param"] == "training_file"
    assert "line 3" in error["message"]


def test_too_long_examples_and_bad_validation_data(tmp_path, model_dir, data, capsys) -> None:
    assert main(_args(model_dir, data["train"], tmp_path / "a", "--max-length", "12")) == 2
    assert "train.jsonl: line 1: too long" in capsys.readouterr().err
    bad_valid = tmp_path / "valid.jsonl"
    bad_valid.write_text('{"text": ""}\n')
    assert main(_args(model_dir, data["train"], tmp_path / "b", "--validation-data", str(bad_valid))) == 2
    assert "valid.jsonl: line 1: `text` must be a non-empty string" in capsys.readouterr().err
    (error,) = [e for e in _events(tmp_path / "b") if e["type"] == "error"]
    assert error["code"] == "invalid_validation_file" and error["param"] == "validation_file"


def test_validate_only_reports_without_writing(tmp_path, model_dir, data, capsys) -> None:
    out = tmp_path / "never"
    assert main(_args(model_dir, data["train"], out, "--validate-only")) == 0
    assert "data OK" in capsys.readouterr().out
    assert not out.exists()


def test_an_existing_run_is_kept_unless_overwrite(tmp_path, model_dir, data, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, data["train"], out, "--max-steps", "1")) == 0
    first = load_file(out / "adapter_model.safetensors")
    assert main(_args(model_dir, data["train"], out, "--max-steps", "1")) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(_args(model_dir, data["train"], out, "--max-steps", "1", "--overwrite")) == 0
    again = load_file(out / "adapter_model.safetensors")
    assert first.keys() == again.keys()
    assert all((first[k] == again[k]).all() for k in first)  # same seed, same data: same adapter
    assert len([e for e in _events(out) if e["type"] == "done"]) == 1  # the old events were replaced


def test_rslora_accumulation_and_step_checkpoints(tmp_path, model_dir, data) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, data["train"], out, "--use-rslora", "--gradient-checkpointing",
                      "--gradient-accumulation-steps", "2", "--batch-size", "2", "--max-steps", "5",
                      "--save-steps", "2", "--target-modules", "q_proj,v_proj", "--lr-scheduler", "linear")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["target_modules"] == ["q_proj", "v_proj"]
    assert read_adapter_spec(out).use_rslora
    events = _events(out)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 5]
    metrics = [e for e in events if e["type"] == "metrics"]
    assert metrics[-1]["epoch"] == pytest.approx(5 / 3, abs=1e-3)  # 6 micro-batches of 2 -> 3 steps/epoch


def test_dora_trains_an_adapter_the_server_loads(tmp_path, model_dir, data) -> None:
    from adapters.weights import load_adapter

    out = tmp_path / "dora"
    assert main(_args(model_dir, data["train"], out, "--use-dora", "--max-steps", "2")) == 0
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    spec = read_adapter_spec(out)
    weights = load_adapter(out, "dora", None, None, spec.max_rank)
    assert spec.use_dora and set(weights.magnitudes) == set(weights.modules)


def test_bad_options_and_a_missing_model(tmp_path, data, capsys) -> None:
    assert main(["--model", "m", "--data", str(data["train"]), "--output", str(tmp_path / "o"),
                 "--epochs", "0"]) == 2
    assert "epochs must be a positive integer, got 0" in capsys.readouterr().err
    out = tmp_path / "missing"
    assert main(["--model", str(tmp_path / "no-such-model"), "--data", str(data["train"]), "--output", str(out),
                 "--no-progress"]) == 1
    (error,) = [e for e in _events(out) if e["type"] == "error"]
    assert error["code"] == "training_error" and error["message"]


def test_quiver_cli_has_the_train_subcommand(model_dir, data, tmp_path) -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["train", "--model", str(model_dir), "--data", str(data["train"]),
                                      "--output", str(tmp_path / "o"), "--lora-rank", "2"])
    assert args.func is run_train and args.lora_rank == 2 and args.epochs == 3
