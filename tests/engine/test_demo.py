from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import demo

PIRATE_WORDS = ("Arr", "matey", "Ahoy", "yo ho")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoBundle:
    return demo.ensure_demo_bundle(tmp_path_factory.mktemp("quiver-cache"))


@pytest.fixture
def quick_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full recipe with a handful of training steps: same code path, a second or two."""
    monkeypatch.setitem(demo._RECIPE, "base_steps", 3)
    monkeypatch.setitem(demo._RECIPE, "adapter_steps", 2)


def _fake_build(out: Path) -> None:
    for path in [out / "model" / "model.safetensors", out / "model" / "tokenizer.json"] + [
        out / "adapters" / name / "adapter_model.safetensors" for name in demo.DEMO_ADAPTERS
    ]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def _generate(model_dir: Path, adapter_dir: Path | None, prompt: str) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_default_cache_dir_honours_quiver_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUIVER_CACHE", str(tmp_path / "c"))
    assert demo.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QUIVER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / ".cache" / "quiver"


def test_bundle_is_in_real_formats(bundle: demo.DemoBundle) -> None:
    from peft import LoraConfig

    config = json.loads((bundle.model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (bundle.model_dir / "model.safetensors").stat().st_size < 8 * 2**20
    tok_config = json.loads((bundle.model_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_config["chat_template"]
    assert (bundle.model_dir / "tokenizer.json").is_file()
    assert set(bundle.adapters) == set(demo.DEMO_ADAPTERS) and len(bundle.adapters) >= 2
    for path in bundle.adapters.values():
        lora = LoraConfig.from_pretrained(path)
        assert lora.r == 8
        assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(lora.target_modules)
        assert (path / "adapter_model.safetensors").is_file()


def test_chat_template_is_chatml(bundle: demo.DemoBundle) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle.model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(tokenizer("Déjà vu 🏹")["input_ids"]) == "Déjà vu 🏹"  # byte-level


def test_base_and_adapters_answer_the_example_differently(bundle: demo.DemoBundle) -> None:
    answers = {"base": _generate(bundle.model_dir, None, demo.EXAMPLE_PROMPT)}
    for name, path in bundle.adapters.items():
        answers[name] = _generate(bundle.model_dir, path, demo.EXAMPLE_PROMPT)
    values = list(answers.values())
    assert len(set(values)) == len(values), answers
    assert len(answers["base"].split()) >= 3, answers
    assert not any(word in answers["base"] for word in PIRATE_WORDS) and "{" not in answers["base"]
    assert any(word in answers["demo-pirate"] for word in PIRATE_WORDS), answers
    assert answers["demo-json"].startswith("{") and "demo-json" in answers["demo-json"], answers


def test_second_call_reuses_the_cache(bundle: demo.DemoBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(out: Path) -> None:
        raise AssertionError("rebuilt a cached bundle")

    monkeypatch.setattr(demo, "_build", fail)
    again = demo.ensure_demo_bundle(bundle.model_dir.parent.parent)
    assert again == bundle


def test_build_is_deterministic_and_restores_torch(tmp_path: Path, quick_recipe: None) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    first = demo.ensure_demo_bundle(tmp_path / "a")
    second = demo.ensure_demo_bundle(tmp_path / "b")
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng)

    pairs = [(first.model_dir / "model.safetensors", second.model_dir / "model.safetensors")]
    pairs += [
        (first.adapters[n] / "adapter_model.safetensors", second.adapters[n] / "adapter_model.safetensors")
        for n in demo.DEMO_ADAPTERS
    ]
    for a, b in pairs:
        left, right = load_file(a), load_file(b)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), a.name
    for rel in ["model/tokenizer.json", "model/tokenizer_config.json", "model/config.json"] + [
        f"adapters/{n}/adapter_config.json" for n in demo.DEMO_ADAPTERS
    ]:
        a = first.model_dir.parent / rel
        assert a.read_bytes() == (second.model_dir.parent / rel).read_bytes(), rel


def test_changed_recipe_gets_a_new_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    name = demo._bundle_dir_name()
    assert name.startswith(f"{demo.DEMO_MODEL_NAME}-v")
    monkeypatch.setitem(demo._RECIPE, "base_steps", 1 + int(demo._RECIPE["base_steps"]))
    assert demo._bundle_dir_name() != name


def test_losing_a_publish_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_build", _fake_build)
    bundle = demo.ensure_demo_bundle(tmp_path)
    final = bundle.model_dir.parent
    marker = final / "winner"
    marker.write_text("first")
    demo._build_and_publish(final)  # what a second process does after losing the race
    assert marker.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [final.name]


def test_stale_staging_dirs_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_build", _fake_build)
    stale = tmp_path / f".{demo._bundle_dir_name()}-killed"
    stale.mkdir()
    bundle = demo.ensure_demo_bundle(tmp_path)
    assert not stale.exists()
    assert (bundle.model_dir / "model.safetensors").is_file()


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []

    def slow_fake_build(out: Path) -> None:
        builds.append(out)
        time.sleep(0.2)  # long enough for the other caller to arrive mid-build
        _fake_build(out)

    monkeypatch.setattr(demo, "_build", slow_fake_build)
    results: list[demo.DemoBundle] = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo_bundle(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(results) == 2 and results[0] == results[1]
