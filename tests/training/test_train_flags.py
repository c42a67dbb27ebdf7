"""`quiver train`'s flags beyond plain LoRA, each on a tiny model on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.batching import collate, pack_examples, token_loss
from training.cli import main
from training.data import ChatRecord, DataError
from training.encoding import IGNORE_INDEX, Example, encode_records
from training.errors import InvalidRequestError
from training.events import read_events
from training.job_params import MERGED_DIR, cli_arguments, resolve_hyperparameters, train_config
from training.neftune import add_neftune_hook
from training.preflight import linear_module_names

QUESTIONS = ["Hello world!", "The quick brown fox.", "Quiver serves adapters.", "Un café au lait.", "Emoji 🎯",
             "What is two and two?", "Name a colour."]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("data") / "train.jsonl", [_chat(q, "The lazy dog.") for q in QUESTIONS])


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--no-progress",
            "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "4", *extra]


def _events(out: Path, kind: str) -> list[dict]:
    return [e for e in read_events(out / "events.jsonl")[0] if e["type"] == kind]


def _refuse_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import transformers

    loads: list[str] = []

    def refuse(what: str):
        def load(*args, **kwargs):
            loads.append(what)
            raise AssertionError(f"{what} was loaded")
        return load

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("tokenizer"))
    return loads


# ---------------------------------------------------------------- target modules, quantize, tensorboard checks
def test_all_linear_adapts_every_linear_layer_but_the_head(tmp_path, model_dir, train_file, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--target-modules", "all-linear", "--max-steps", "1")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    names = linear_module_names(str(model_dir))
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == set(names)
    weights = load_file(str(out / "adapter_model.safetensors"))
    adapted = {k.split(".lora_A")[0] for k in weights if ".lora_A" in k}
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(adapted) == layers * len(names)  # every linear layer of every block, the head left alone
    assert "warning" not in capsys.readouterr().err  # every one of them is servable


def test_unknown_target_modules_are_refused_before_loading(tmp_path, model_dir, train_file, monkeypatch,
                                                          capsys) -> None:
    loads = _refuse_loading(monkeypatch)
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--target-modules", "q_proj,qkv_proj")) == 2
    err = capsys.readouterr().err
    assert "['qkv_proj'] name no module" in err and "down_proj" in err and "all-linear" in err
    assert loads == [] and not out.exists()
    assert main(_args(model_dir, train_file, out, "--target-modules", "all-linear,q_proj")) == 2
    assert "stands alone" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quantize_without_cuda_is_refused_before_loading(tmp_path, model_dir, train_file, monkeypatch,
                                                         capsys) -> None:
    loads = _refuse_loading(monkeypatch)
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--quantize", "4bit")) == 2
    assert "--quantize 4bit needs a CUDA GPU" in capsys.readouterr().err
    assert loads == [] and not out.exists()


def test_quantize_without_bitsandbytes_is_refused_before_loading(tmp_path, model_dir, train_file, monkeypatch,
                                                                 capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    loads = _refuse_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    assert main(_args(model_dir, train_file, tmp_path / "run", "--quantize", "8bit")) == 2
    assert "--quantize 8bit needs bitsandbytes, which is not installed" in capsys.readouterr().err
    assert loads == []


def test_report_to_tensorboard_without_tensorboard_is_refused(tmp_path, model_dir, train_file, monkeypatch,
                                                              capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    loads = _refuse_loading(monkeypatch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    assert main(_args(model_dir, train_file, tmp_path / "run", "--report-to", "tensorboard")) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err and loads == []


def test_tensorboard_gets_an_event_file_with_the_loss(tmp_path, model_dir, train_file) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--report-to", "tensorboard", "--max-steps", "3")) == 0
    (event_file,) = (out / "runs").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(event_file.parent))
    scalars.Reload()
    losses = [s.value for s in scalars.Scalars("train/loss")]
    assert len(losses) == 3
    assert losses[-1] == pytest.approx(_events(out, "metrics")[-1]["train_loss"], rel=1e-5)


# ---------------------------------------------------------------- NEFTune
def test_neftune_noise_only_in_train_mode_and_within_its_bound(model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(5, 100, (2, 9))
    clean = model.get_input_embeddings()(ids)
    handle = add_neftune_hook(model, alpha=5.0)
    model.train()
    noisy = model.get_input_embeddings()(ids)
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[-1])
    assert not torch.equal(noisy, clean)
    assert (noisy - clean).abs().max() <= bound + 1e-6
    assert (noisy - clean).abs().max() > bound / 2  # uniform over the whole range, not a tiny jitter
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(model.get_input_embeddings()(ids), clean)


def test_neftune_trains_differently_and_evaluates_cleanly(tmp_path, model_dir, train_file) -> None:
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    assert main(_args(model_dir, train_file, plain, "--max-steps", "2", "--lr", "1e-2")) == 0
    assert main(_args(model_dir, train_file, noisy, "--max-steps", "2", "--lr", "1e-2",
                      "--neftune-alpha", "5")) == 0
    first = [_events(out, "metrics")[0]["train_loss"] for out in (plain, noisy)]
    assert first[0] != first[1]  # the noise reaches the training forward pass
    meta = json.loads((noisy / "training_metadata.json").read_text())
    assert meta["config"]["neftune_alpha"] == 5.0


# ---------------------------------------------------------------- packing and truncation
def _example(line: int, n: int, first_label: int = 10) -> Example:
    ids = list(range(first_label, first_label + n))
    return Example(line, ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :])


def test_packing_lays_examples_end_to_end_with_positions_restarting() -> None:
    examples = [_example(1, 5), _example(2, 4, 40), _example(3, 6, 60), _example(4, 3, 80)]
    packed = pack_examples(examples, max_length=10)
    assert [p.segments for p in packed] == [(5, 4), (6, 3)]
    assert packed[0].input_ids == examples[0].input_ids + examples[1].input_ids
    batch = collate(packed, pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    # Loss masks kept; an example's first token is never predicted from the previous example.
    assert batch["labels"][0, :9].tolist() == examples[0].labels + [IGNORE_INDEX] + examples[1].labels[1:]
    assert int(batch["num_trained"]) == sum(e.num_trained for e in examples)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_attention_does_not_cross_examples(model_dir, attention) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).eval()
    examples = [_example(1, 7, 20), _example(2, 5, 50), _example(3, 6, 70)]
    packed = collate(pack_examples(examples, max_length=64), pad_id=0)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss_packed, _ = token_loss(model, packed, torch.device("cpu"))
        loss_alone = sum(float(token_loss(model, collate([e], 0), torch.device("cpu"))[0]) for e in examples)
    assert float(loss_packed) == pytest.approx(loss_alone, rel=1e-5)


def test_packing_trains_on_fewer_sequences(tmp_path, model_dir, train_file) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--packing", "--max-length", "128", "--batch-size", "1",
                      "--epochs", "1")) == 0
    (message,) = [e["message"] for e in _events(out, "message") if e["message"].startswith("packed")]
    packed = int(message.split(" into ")[1].split()[0])
    assert packed < len(QUESTIONS)
    assert _events(out, "done")[0]["step"] == packed  # one sequence per step at batch size 1


def test_truncate_caps_a_long_example_and_keeps_its_assistant_labels(model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    record = ChatRecord(1, [{"role": "user", "content": "Say it.", "weight": 0},
                            {"role": "assistant", "content": "lazy dog " * 40, "weight": 1}])
    (full,) = encode_records([record], tokenizer, 10_000, "t")
    limit = len(full.input_ids) - 30
    with pytest.raises(DataError, match="too long"):
        encode_records([record], tokenizer, limit, "t")
    (cut,) = encode_records([record], tokenizer, limit, "t", truncate=True)
    assert len(cut.input_ids) == limit
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]
    assert cut.num_trained > 0
    with pytest.raises(DataError, match="no token to learn from after truncation"):
        encode_records([record], tokenizer, 3, "t", truncate=True)  # only the prompt would be left


def test_truncate_flag_accepts_long_examples(tmp_path, model_dir, train_file, capsys) -> None:
    data = _write(tmp_path / "long.jsonl", [_chat("Hi", "lazy dog " * 60), _chat("Hi", "lazy dog")])
    assert main(_args(model_dir, data, tmp_path / "a", "--max-length", "64")) == 2
    assert "line 1: too long" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main(_args(model_dir, data, out, "--max-length", "64", "--truncate", "--max-steps", "1")) == 0
    (train_info,) = [e["message"] for e in _events(out, "message") if e["message"].startswith("train data")]
    assert "2 examples" in train_info
    assert 64 < _events(out, "metrics")[0]["tokens"] <= 2 * 64


# ---------------------------------------------------------------- validation split, early stopping, resume
def test_val_split_evaluates_each_epoch(tmp_path, model_dir, train_file) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--val-split", "0.3", "--epochs", "3", "--batch-size", "2")) == 0
    val = _events(out, "val_loss")
    assert [e["epoch"] for e in val] == [1.0, 2.0, 3.0]
    assert all(e["val_loss"] > 0 for e in val)
    data = json.loads((out / "training_metadata.json").read_text())["data"]
    assert data["validation"]["examples"] == 2 and data["train"]["examples"] == len(QUESTIONS) - 2


def test_early_stopping_stops_when_validation_gets_worse(tmp_path, model_dir, train_file) -> None:
    # Train teaches one answer, validation expects another: validation loss rises as training goes on.
    valid = _write(tmp_path / "valid.jsonl", [_chat(q, "Quick red cat!") for q in QUESTIONS[:3]])
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--validation-data", str(valid), "--epochs", "12",
                      "--lr", "3e-2", "--warmup-ratio", "0", "--early-stopping-patience", "2")) == 0
    val = [e["val_loss"] for e in _events(out, "val_loss")]
    done = _events(out, "done")[0]
    assert done["step"] < 12 * 2 and len(val) < 12
    best = val.index(min(val))
    assert len(val) == best + 3  # the best, then two evaluations without improvement
    assert any(e["message"].startswith("early stopping") for e in _events(out, "message"))
    assert json.loads((out / "training_metadata.json").read_text())["step"] == done["step"]


def test_early_stopping_needs_a_validation_set(tmp_path, model_dir, train_file, capsys) -> None:
    assert main(_args(model_dir, train_file, tmp_path / "run", "--early-stopping-patience", "2")) == 2
    assert "needs a validation set" in capsys.readouterr().err


def test_resume_continues_to_the_uninterrupted_runs_weights(tmp_path, model_dir, train_file) -> None:
    flags = ("--max-steps", "6", "--save-steps", "3", "--lr", "1e-2", "--batch-size", "2", "--seed", "7")
    whole = tmp_path / "whole"
    assert main(_args(model_dir, train_file, whole, *flags)) == 0
    checkpoint = whole / "checkpoints" / "ckpt-3"
    resumed = tmp_path / "resumed"
    assert main(_args(model_dir, train_file, resumed, *flags, "--resume-from", str(checkpoint))) == 0
    assert [e["step"] for e in _events(resumed, "metrics")] == [4, 5, 6]
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    whole_loss = [e["train_loss"] for e in _events(whole, "metrics")][3:]
    assert [e["train_loss"] for e in _events(resumed, "metrics")] == pytest.approx(whole_loss, rel=1e-5)


def test_resume_in_the_same_output_and_bad_checkpoints(tmp_path, model_dir, train_file, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, train_file, out, "--max-steps", "4", "--save-steps", "2")) == 0
    assert main(_args(model_dir, train_file, out, "--max-steps", "6", "--save-steps", "2",
                      "--resume-from", str(out / "checkpoints" / "ckpt-4"))) == 0
    assert _events(out, "done")[-1]["step"] == 6
    assert main(_args(model_dir, train_file, tmp_path / "x", "--resume-from", str(out))) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- merge
def test_merge_to_writes_a_full_model_equal_to_base_plus_adapter(tmp_path, model_dir, train_file) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged_dir = tmp_path / "run", tmp_path / "merged"
    assert main(_args(model_dir, train_file, out, "--max-steps", "3", "--lr", "5e-2",
                      "--merge-to", str(merged_dir))) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer("The quick brown fox.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got, plain = adapted(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the adapter changed something that the merge kept


# ---------------------------------------------------------------- job hyperparameters
def test_job_hyperparameters_carry_the_new_flags(tmp_path) -> None:
    hp = resolve_hyperparameters({"target_modules": ["all-linear"], "neftune_alpha": 5, "packing": True,
                                  "truncate": True, "val_split": 0.1, "early_stopping_patience": 2,
                                  "report_to": "tensorboard", "merge": True})
    config = train_config(hp, model="m", data=Path("d.jsonl"), output=tmp_path / "out")
    assert config.merge_to == tmp_path / "out" / MERGED_DIR
    args = cli_arguments(config)
    import argparse

    from training.cli import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_args(parser.parse_args(args)) == config


@pytest.mark.parametrize(("hp", "param"), [
    ({"neftune_alpha": -1}, "hyperparameters"),
    ({"neftune_alpha": "loud"}, "hyperparameters.neftune_alpha"),
    ({"packing": "yes"}, "hyperparameters.packing"),
    ({"truncate": 1}, "hyperparameters.truncate"),
    ({"val_split": 1.5}, "hyperparameters"),
    ({"early_stopping_patience": 2}, "hyperparameters"),  # no validation set
    ({"early_stopping_patience": -1, "val_split": 0.2}, "hyperparameters"),
    ({"report_to": "wandb"}, "hyperparameters"),
    ({"quantize": "3bit"}, "hyperparameters"),
    ({"target_modules": ["all-linear", "q_proj"]}, "hyperparameters"),
    ({"merge": "please"}, "hyperparameters.merge"),
])
def test_bad_new_job_hyperparameters_are_refused(hp, param) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_hyperparameters(hp)
    assert info.value.param == param


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_quantized_job_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(InvalidRequestError, match="needs a CUDA GPU") as info:
        resolve_hyperparameters({"quantize": "4bit"})
    assert info.value.param == "hyperparameters.quantize"


def test_job_route_takes_the_new_hyperparameters_and_400s_bad_ones(tmp_path, model_dir, train_file) -> None:
    from starlette.testclient import TestClient

    from server.app import create_app
    from server.finetune.routes import finetune_routes
    from server.state import ServerState
    from training.jobs import JobManager

    class _NoEngine:
        model_name = "tiny-base"

        async def start(self) -> None:
            pass

        async def shutdown(self) -> None:
            pass

    manager = JobManager(tmp_path / "ft", base_model=str(model_dir), model_name="tiny-base")  # never started
    try:
        app = create_app(ServerState(_NoEngine()), extra_routes=finetune_routes(manager))
        client = TestClient(app)
        upload = client.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("train.jsonl", train_file.read_bytes())})
        file_id = upload.json()["id"]
        good = {"target_modules": ["all-linear"], "neftune_alpha": 5, "packing": True, "truncate": True,
                "val_split": 0.2, "early_stopping_patience": 1, "merge": True}
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-base", "training_file": file_id,
                                                         "hyperparameters": good})
        assert job.status_code == 200, job.text
        assert job.json()["hyperparameters"]["neftune_alpha"] == 5
        for bad, param in (({"neftune_alpha": -1}, "hyperparameters"), ({"packing": "yes"}, "hyperparameters.packing"),
                           ({"quantize": "3bit"}, "hyperparameters")):
            response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-base", "training_file": file_id,
                                                                  "hyperparameters": bad})
            assert response.status_code == 400 and response.json()["error"]["param"] == param, bad
    finally:
        manager.close()


def test_seekrflow_training_config_carries_the_new_flags_as_extra_fields() -> None:
    # SeekrFlow's TrainingConfig has no fields for these; the SDK sends extra fields through.
    from server.seekrflow.bodies import TrainingConfig as _TrainingConfig

    config = _TrainingConfig(training_files=["file-1"], model="m", n_epochs=2, packing=True, neftune_alpha=5,
                             val_split=0.2, early_stopping_patience=1, merge=True, colour="red")
    hp = config.hyperparameters()
    assert hp == {"n_epochs": 2, "packing": True, "neftune_alpha": 5, "val_split": 0.2,
                  "early_stopping_patience": 1, "merge": True}
    assert resolve_hyperparameters(hp)["packing"] is True
