from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterWeightsError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from adapters.weights import WEIGHTS_NAME, load_adapter

# tiny llama from tests.factories: hidden 64, 4 heads x 16, 2 kv heads, intermediate 128, 2 layers
SHAPES = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}
KEY = "base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter(model_dir, tiny_adapter_factory):
    return tiny_adapter_factory(model_dir, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def load(path: Path, **overrides):
    kwargs = dict(name="a1", expected_shapes=SHAPES, num_layers=2, max_rank=16)
    kwargs.update(overrides)
    return load_adapter(path, **kwargs)


def copy_adapter(src: Path, dst: Path, tensors=None, **config) -> Path:
    """A copy of `src` with tensors transformed by `tensors(dict)` and config fields overridden."""
    shutil.copytree(src, dst)
    if tensors is not None:
        state = load_file(dst / WEIGHTS_NAME)
        save_file(tensors(state), dst / WEIGHTS_NAME)
    if config:
        raw = json.loads((dst / "adapter_config.json").read_text())
        raw.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(raw))
    return dst


def test_loads_pairs_and_folds_scale_into_b(adapter):
    raw = load_file(adapter / WEIGHTS_NAME)
    weights = load(adapter)
    assert set(weights.modules) == {(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")}
    assert weights.max_rank == 4 and weights.name == "a1" and weights.spec.rank == 4
    a, b = weights.modules[(1, "v_proj")]
    key = KEY.format(layer=1, parent="self_attn", module="v_proj", which="{}")
    assert torch.equal(a, raw[key.format("A")])
    assert torch.allclose(b, raw[key.format("B")] * 2.0, rtol=0, atol=0)  # alpha 8 / r 4
    assert (a.shape, b.shape) == ((4, 64), (32, 4))
    assert weights.size_bytes == sum(t.numel() * 4 for t in raw.values())


def test_rank_pattern_rslora_gives_per_module_rank_and_scale(model_dir, tiny_adapter_factory):
    path = tiny_adapter_factory(
        model_dir,
        rank=8,
        alpha=16.0,
        use_rslora=True,
        target_modules=("k_proj", "down_proj"),
        rank_pattern={"layers.1.mlp.down_proj": 2},
        alpha_pattern={"k_proj": 4.0},
    )
    raw = load_file(path / WEIGHTS_NAME)
    weights = load(path)
    a, b = weights.modules[(1, "down_proj")]
    assert a.shape == (2, 128)
    expected = raw[KEY.format(layer=1, parent="mlp", module="down_proj", which="B")] * (16.0 / 2**0.5)
    assert torch.allclose(b, expected)
    _, b_k = weights.modules[(0, "k_proj")]
    assert torch.allclose(
        b_k, raw[KEY.format(layer=0, parent="self_attn", module="k_proj", which="B")] * (4 / 8**0.5)
    )
    assert weights.max_rank == 8


def test_dtype_cast_after_folding_in_fp32(adapter):
    raw = load_file(adapter / WEIGHTS_NAME)
    a, b = load(adapter, dtype=torch.bfloat16).modules[(0, "q_proj")]
    assert a.dtype == b.dtype == torch.bfloat16
    raw_b = raw[KEY.format(layer=0, parent="self_attn", module="q_proj", which="B")]
    assert torch.equal(b, (raw_b * 2.0).to(torch.bfloat16))


def test_adapter_name_infix_tolerated(adapter, tmp_path):
    def add_default(state):
        return {k.replace(".weight", ".default.weight"): v for k, v in state.items()}

    infixed = load(copy_adapter(adapter, tmp_path / "x", tensors=add_default))
    plain = load(adapter)
    assert set(infixed.modules) == set(plain.modules)
    for key, (a, b) in plain.modules.items():
        assert torch.equal(infixed.modules[key][0], a) and torch.equal(infixed.modules[key][1], b)


class _Trap:
    """Unpickling this would create a file: proves pickle weights are never opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_refused_never_unpickled(adapter, tmp_path):
    path = tmp_path / "pickled"
    shutil.copytree(adapter, path)
    (path / WEIGHTS_NAME).unlink()
    marker = tmp_path / "unpickled"
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UnsafeAdapterFormatError, match="pickle weights are refused; convert to safetensors"):
        load(path)
    assert not marker.exists()


def test_missing_weights_and_missing_config(adapter, tmp_path):
    no_weights = tmp_path / "nw"
    shutil.copytree(adapter, no_weights)
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterNotFoundError, match=f"{WEIGHTS_NAME} is missing"):
        load(no_weights)
    no_config = tmp_path / "nc"
    shutil.copytree(adapter, no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json is missing"):
        load(no_config)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(adapter, tmp_path, damage):
    path = copy_adapter(adapter, tmp_path / "c")
    data = (path / WEIGHTS_NAME).read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = (1000).to_bytes(8, "little") + b"{this is not json" + data[25:]
    (path / WEIGHTS_NAME).write_bytes(data)
    with pytest.raises(AdapterWeightsError, match="corrupt or not a safetensors file"):
        load(path)


def test_wrong_shape_names_module_expected_and_actual(adapter):
    with pytest.raises(
        AdapterWeightsError, match=r"model.layers.0.self_attn.v_proj.*expected out_features 48, got 32"
    ):
        load(adapter, expected_shapes={**SHAPES, "v_proj": (64, 48)})
    with pytest.raises(AdapterWeightsError, match=r"q_proj.*expected in_features 96, got 64"):
        load(adapter, expected_shapes={**SHAPES, "q_proj": (96, 64)})


def test_rank_above_max_rank(adapter):
    with pytest.raises(AdapterWeightsError, match="rank 4 exceeds the server's max_rank 2"):
        load(adapter, max_rank=2)


def test_layer_index_out_of_range(adapter):
    with pytest.raises(
        AdapterWeightsError, match=r"layer index 1 is out of range; the base model has 1 layers"
    ):
        load(adapter, num_layers=1)


def test_nan_weights_refused(adapter, tmp_path):
    def poison(state):
        key = KEY.format(layer=1, parent="self_attn", module="q_proj", which="B")
        state[key] = state[key].clone()
        state[key][3, 1] = float("nan")
        return state

    with pytest.raises(AdapterWeightsError, match=r"layers.1.self_attn.q_proj: lora_B has 1 non-finite"):
        load(copy_adapter(adapter, tmp_path / "n", tensors=poison))


def test_rank_disagreeing_with_config(adapter, tmp_path):
    with pytest.raises(
        AdapterWeightsError, match="lora_A has rank 4 but adapter_config gives this module rank 8"
    ):
        load(copy_adapter(adapter, tmp_path / "r", r=8))


def test_a_and_b_ranks_must_agree(adapter, tmp_path):
    def shrink_b(state):
        key = KEY.format(layer=0, parent="self_attn", module="v_proj", which="B")
        state[key] = state[key][:, :3].contiguous()
        return state

    with pytest.raises(AdapterWeightsError, match=r"lora_B is \[32, 3\]; expected \[out, 4\]"):
        load(copy_adapter(adapter, tmp_path / "ab", tensors=shrink_b))


def test_missing_b(adapter, tmp_path):
    def drop_b(state):
        del state[KEY.format(layer=0, parent="self_attn", module="q_proj", which="B")]
        return state

    with pytest.raises(AdapterWeightsError, match="model.layers.0.self_attn.q_proj: lora_B is missing"):
        load(copy_adapter(adapter, tmp_path / "mb", tensors=drop_b))


def test_weights_for_untargeted_module(adapter, tmp_path):
    with pytest.raises(
        AdapterWeightsError, match=r"targets 'model.layers.0.self_attn.v_proj' but target_modules"
    ):
        load(copy_adapter(adapter, tmp_path / "t", target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("extra_key", "error", "message"),
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            AdapterWeightsError,
            "a DoRA magnitude vector, but use_dora is false",
        ),
        ("base_model.model.lm_head.lora_A.weight", UnsupportedAdapterError, "lm_head"),
        ("base_model.model.model.norm.weight", AdapterWeightsError, "unexpected tensor"),
    ],
)
def test_unexpected_tensors(adapter, tmp_path, extra_key, error, message):
    def add(state):
        return {**state, extra_key: torch.ones(4)}

    with pytest.raises(error, match=message):
        load(copy_adapter(adapter, tmp_path / "u", tensors=add))


def test_config_errors_surface_before_weights(adapter, tmp_path):
    with pytest.raises(AdapterConfigError, match="bias"):
        load(copy_adapter(adapter, tmp_path / "d", bias="all"))
