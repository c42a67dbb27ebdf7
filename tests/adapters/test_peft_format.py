from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapters.errors import AdapterConfigError, AdapterError, AdapterNotFoundError, UnsupportedAdapterError
from adapters.peft_format import SUPPORTED_TARGETS, AdapterSpec, module_path, read_adapter_spec

ALL_TARGETS = list(SUPPORTED_TARGETS)


def write_config(path: Path, **overrides) -> Path:
    """A real PEFT-written adapter_config.json, then raw JSON overrides (some refused configs PEFT would write)."""
    from peft import LoraConfig

    LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    ).save_pretrained(path)
    config_file = path / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    raw.update(overrides)
    config_file.write_text(json.dumps(raw))
    return path


def test_reads_a_real_adapter(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    adapter = tiny_adapter_factory(
        model_dir, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")
    )
    spec = read_adapter_spec(adapter)
    assert (spec.rank, spec.alpha, spec.use_rslora) == (4, 8.0, False)
    assert spec.target_modules == {"q_proj", "v_proj", "down_proj"}
    assert spec.base_model_name_or_path == str(model_dir)
    assert spec.layers_to_transform is None
    assert spec.scale_for(module_path(1, "down_proj")) == (4, 2.0)


def test_plain_and_rslora_scaling(tmp_path):
    plain = read_adapter_spec(write_config(tmp_path / "plain", r=16, lora_alpha=32))
    rs = read_adapter_spec(write_config(tmp_path / "rs", r=16, lora_alpha=32, use_rslora=True))
    assert plain.scale_for(module_path(0, "q_proj")) == (16, 2.0)
    assert rs.scale_for(module_path(0, "q_proj")) == (16, 32 / math.sqrt(16))


def test_rank_and_alpha_patterns_layer_specific_and_bare(tmp_path):
    spec = read_adapter_spec(
        write_config(
            tmp_path,
            r=8,
            lora_alpha=16,
            target_modules=ALL_TARGETS,
            rank_pattern={"layers.1.self_attn.v_proj": 2, "o_proj": 4},
            alpha_pattern={"v_proj": 6},
        )
    )
    assert spec.max_rank == 8
    assert spec.scale_for(module_path(0, "v_proj")) == (8, 6 / 8)  # bare alpha key, default rank
    assert spec.scale_for(module_path(1, "v_proj")) == (2, 6 / 2)  # layer-specific rank key
    assert spec.scale_for(module_path(3, "o_proj")) == (4, 16 / 4)
    assert spec.scale_for(module_path(0, "q_proj")) == (8, 2.0)
    # "o_proj" must not match a module that merely ends in the same letters.
    assert spec.scale_for("model.layers.0.self_attn.xo_proj") == (8, 2.0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_for_matches_peft_on_every_module(use_rslora):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from tests.factories import tiny_config

    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=ALL_TARGETS,
        use_rslora=use_rslora,
        rank_pattern={"layers.1.self_attn.v_proj": 2, "o_proj": 4, "model.layers.0.mlp.up_proj": 6},
        alpha_pattern={"v_proj": 3.0, "layers.0.mlp.down_proj": 64},
    )
    config = LoraConfig(task_type="CAUSAL_LM", **kwargs)
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=32)), config)
    spec = AdapterSpec(
        rank=8,
        alpha=16.0,
        use_rslora=use_rslora,
        rank_pattern=kwargs["rank_pattern"],
        alpha_pattern=kwargs["alpha_pattern"],
        target_modules=frozenset(ALL_TARGETS),
        base_model_name_or_path=None,
    )
    seen = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            path = name.removeprefix("base_model.model.")
            rank, scaling = spec.scale_for(path)
            assert rank == module.r["default"], path
            assert scaling == pytest.approx(module.scaling["default"], rel=1e-12), path
            seen += 1
    assert seen == 2 * len(ALL_TARGETS)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (r".*\.(q_proj|v_proj)", {"q_proj", "v_proj"}),
        (r"model\.layers\.1\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
        ("all-linear", set(ALL_TARGETS)),
        (["self_attn.k_proj", "model.layers.0.mlp.up_proj"], {"k_proj", "up_proj"}),
    ],
)
def test_target_modules_resolved_with_peft_matching(tmp_path, targets, expected):
    assert read_adapter_spec(write_config(tmp_path, target_modules=targets)).target_modules == expected


def test_layers_to_transform_and_exclude_modules_honoured(tmp_path):
    spec = read_adapter_spec(
        write_config(
            tmp_path,
            target_modules=["q_proj", "v_proj", "o_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
            exclude_modules=["o_proj"],
        )
    )
    assert spec.layers_to_transform == {1}
    assert spec.target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"bias": "all"}, UnsupportedAdapterError, r"bias='all'.*expected bias='none'"),
        ({"lora_bias": True}, UnsupportedAdapterError, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, r"modules_to_save=\['lm_head'\]"),
        ({"fan_in_fan_out": True}, UnsupportedAdapterError, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, UnsupportedAdapterError, r"peft_type is 'IA3'; only 'LORA'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, UnsupportedAdapterError, "embed_tokens.*embeddings"),
        ({"target_modules": ["lm_head", "v_proj"]}, UnsupportedAdapterError, "'lm_head'.*not supported"),
        ({"target_modules": r".*(q_proj|lm_head)"}, UnsupportedAdapterError, "'lm_head'"),
        ({"target_modules": ["q_proj", "c_attn"]}, UnsupportedAdapterError, r"module 'c_attn' matches none"),
        ({"target_modules": r".*decoder.*query"}, UnsupportedAdapterError, "regex .* matches none"),
        ({"target_modules": []}, AdapterConfigError, "target_modules is empty"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, AdapterConfigError, "no module"),
        ({"init_lora_weights": "pissa"}, UnsupportedAdapterError, "modifies the base weights"),
        ({"layer_replication": [[0, 1]]}, UnsupportedAdapterError, "layer_replication"),
        ({"alora_invocation_tokens": [5]}, UnsupportedAdapterError, "aLoRA"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, UnsupportedAdapterError, "target_parameters"),
        ({"r": 0}, AdapterConfigError, "r must be a positive integer, got 0"),
        ({"rank_pattern": {"v_proj": -2}}, AdapterConfigError, r"rank_pattern\['v_proj'\].* got -2"),
        (
            {"alpha_pattern": {"v_proj(": 2}},
            AdapterConfigError,
            r"alpha_pattern key 'v_proj\(' is not a valid",
        ),
        (
            {"rank_pattern": None, "alpha_pattern": [1]},
            AdapterConfigError,
            "alpha_pattern must be a JSON object",
        ),
        ({"lora_alpha": "big"}, AdapterConfigError, "lora_alpha must be a finite number, got 'big'"),
    ],
)
def test_refusals_name_the_adapter_and_the_value(tmp_path, overrides, error, message):
    adapter = write_config(tmp_path / "my-adapter", **overrides)
    with pytest.raises(error, match=message) as info:
        read_adapter_spec(adapter)
    assert "adapter 'my-adapter'" in str(info.value)
    assert info.value.adapter == "my-adapter"


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        read_adapter_spec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json is missing"):
        read_adapter_spec(tmp_path / "empty", name="x")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "{\"r\": " + "9" * 5000 + "}"])
def test_malformed_json(tmp_path, text):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterConfigError):
        read_adapter_spec(tmp_path)


def test_errors_share_one_base_class():
    assert issubclass(UnsupportedAdapterError, AdapterConfigError)
    assert all(issubclass(e, AdapterError) for e in (AdapterConfigError, AdapterNotFoundError))
