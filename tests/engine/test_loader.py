"""Resolving model references and loading safetensors checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.loader import load_model, resolve_model_dir, safetensors_files


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_weights_equal(model, model_dir: Path) -> None:
    """Every checkpoint tensor sits where the packed mapping says it should."""
    state = {}
    for file in safetensors_files(model_dir):
        state.update(load_file(file))
    layer = model.model.layers[1]
    q = layer.self_attn.qkv_proj.output_sizes[0]
    k = layer.self_attn.qkv_proj.output_sizes[1]
    qkv = layer.self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[:q], state["model.layers.1.self_attn.q_proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(
        qkv[q : q + k], state["model.layers.1.self_attn.k_proj.weight"], atol=0, rtol=0
    )
    torch.testing.assert_close(qkv[q + k :], state["model.layers.1.self_attn.v_proj.weight"], atol=0, rtol=0)
    inter = layer.mlp.gate_up_proj.output_sizes[0]
    torch.testing.assert_close(
        layer.mlp.gate_up_proj.weight[inter:], state["model.layers.1.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"])


def test_loads_local_dir(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama")
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    assert loaded.model_dir == model_dir
    assert loaded.hf_config.architectures == ["LlamaForCausalLM"]
    _assert_weights_equal(loaded.model, model_dir)


def test_loads_sharded_checkpoint(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("qwen2", max_shard_size="20KB")
    assert len(safetensors_files(model_dir)) > 1
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    _assert_weights_equal(loaded.model, model_dir)
    assert loaded.model.model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0


def test_missing_shard_is_reported(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("qwen2", max_shard_size="20KB"), tmp_path / "m")
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(str(model_dir), torch.float32, "cpu")


def test_refuses_pickle_only_dir(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load_model(str(model_dir), torch.float32, "cpu")


def test_dir_without_weights(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(model_dir), torch.float32, "cpu")


def _rewrite_checkpoint(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    _rewrite_checkpoint(model_dir, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(str(model_dir), torch.float32, "cpu")


def test_missing_lm_head_is_an_error_when_untied(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    _rewrite_checkpoint(model_dir, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(str(model_dir), torch.float32, "cpu")


def test_tied_checkpoint_without_lm_head_loads(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("qwen3")  # tied in the factory config
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_shape_mismatch_and_unexpected_tensors(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")

    def shrink(state):
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]

    _rewrite_checkpoint(model_dir, shrink)
    with pytest.raises(ValueError, match=r"up_proj.*shape"):
        load_model(str(model_dir), torch.float32, "cpu")

    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m2")
    _rewrite_checkpoint(model_dir, lambda s: s.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.extra\.weight"):
        load_model(str(model_dir), torch.float32, "cpu")


def test_rotary_inv_freq_keys_are_ignored(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    _rewrite_checkpoint(
        model_dir, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    )
    load_model(str(model_dir), torch.float32, "cpu")


def test_unsupported_architecture(tiny_model_factory, tmp_path) -> None:
    model_dir = _copy(tiny_model_factory("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_model(str(model_dir), torch.float32, "cpu")


def test_loads_into_requested_dtype(tiny_model_factory) -> None:
    loaded = load_model(str(tiny_model_factory("llama")), torch.bfloat16, "cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_missing_local_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))


def _hub_cache(tmp_path: Path, model_dir: Path, repo_id: str) -> Path:
    """The cache layout huggingface_hub writes: models--org--name/{refs/main,snapshots/<commit>/}."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def offline_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    def use(cache: Path) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        # huggingface_hub reads the environment at import; point its constants too.
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    return use


def test_hub_id_from_offline_cache(tiny_model_factory, tmp_path, offline_hub_cache) -> None:
    model_dir = tiny_model_factory("qwen3")
    cache = _hub_cache(tmp_path, model_dir, "quiver-test/tiny-qwen3")
    offline_hub_cache(cache)
    resolved = resolve_model_dir("quiver-test/tiny-qwen3")
    assert resolved.is_relative_to(cache) and (resolved / "config.json").is_file()
    loaded = load_model("quiver-test/tiny-qwen3", torch.float32, "cpu")
    assert loaded.hf_config.architectures == ["Qwen3ForCausalLM"]
    _assert_weights_equal(loaded.model, model_dir)


def test_hub_id_not_cached_offline(tmp_path, offline_hub_cache) -> None:
    offline_hub_cache(tmp_path / "empty-hub")
    with pytest.raises(FileNotFoundError, match="quiver-test/absent"):
        resolve_model_dir("quiver-test/absent")
