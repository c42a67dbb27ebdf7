"""Our Llama-family models against transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.kv_cache import allocate_kv_cache
from engine.model_runner import ModelRunner
from engine.models import build_model
from engine.models.layers import FusedLinear
from engine.models.loader import load_model
from scheduler.sequence import Sequence
from tests.factories import ARCHITECTURES, build_model_dir

BLOCK_SIZE = 4
ATOL = 1e-4


def _hf_last_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0, -1]


def _make_seqs(lens: list[int], vocab: int, seed: int = 0, blocks_per_seq: int = 8) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lens):
        seq = Sequence(
            seq_id=i, prompt_token_ids=torch.randint(0, vocab, (n,), generator=gen).tolist(), max_tokens=8
        )
        # Interleave blocks across sequences so a wrong block table cannot go unnoticed.
        seq.block_table = [i + len(lens) * j for j in range(blocks_per_seq)]
        seqs.append(seq)
    return seqs


def _check_prefill_then_decode(model_dir, lens=(5, 11, 2), decode_steps=3, chunk=None) -> None:
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = loaded.hf_config.vocab_size
    seqs = _make_seqs(list(lens), vocab)
    allocate_kv_cache(
        loaded.model, num_blocks=8 * len(seqs), block_size=BLOCK_SIZE, dtype=torch.float32, device="cpu"
    )
    runner = ModelRunner(loaded.model, BLOCK_SIZE, "cpu")
    slots = [-1] * len(seqs)

    if chunk is not None:  # a first prefill chunk, then the rest against the cached prefix
        runner.execute(seqs, [chunk] * len(seqs), True, slots)
        for seq in seqs:
            seq.num_computed_tokens = chunk
    logits = runner.execute(seqs, [s.num_tokens - s.num_computed_tokens for s in seqs], True, slots)
    assert logits.shape == (len(seqs), vocab)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(logits[i], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0)
        seq.num_computed_tokens = seq.num_tokens

    for _ in range(decode_steps):
        for seq in seqs:  # feed the greedy token so decode follows a realistic path
            seq.output_token_ids.append(int(logits[seqs.index(seq)].argmax()))
        logits = runner.execute(seqs, [1] * len(seqs), False, slots)
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(logits[i], _hf_last_logits(hf, seq.token_ids), atol=ATOL, rtol=0)
            seq.num_computed_tokens = seq.num_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_decode_match_transformers(tiny_model_factory, arch: str) -> None:
    _check_prefill_then_decode(tiny_model_factory(arch))


def test_chunked_prefill_matches_transformers(tiny_model_factory) -> None:
    _check_prefill_then_decode(tiny_model_factory("llama"), lens=(7, 10), decode_steps=1, chunk=3)


def test_tied_embeddings_share_one_tensor(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama", tie_word_embeddings=True)
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    _check_prefill_then_decode(model_dir, lens=(4, 6), decode_steps=1)


def test_untied_embeddings_are_separate(tiny_model_factory) -> None:
    loaded = load_model(str(tiny_model_factory("llama")), torch.float32, "cpu")
    assert not torch.equal(loaded.model.lm_head.weight, loaded.model.model.embed_tokens.weight)


def test_sharded_checkpoint_matches_transformers(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("qwen2", max_shard_size="20KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    _check_prefill_then_decode(model_dir, lens=(6, 3), decode_steps=1)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(tmp_path, rope: dict) -> None:
    # build_model_dir directly: the session factory caches by hashable overrides only.
    model_dir = build_model_dir(tmp_path, "llama", rope_parameters={**rope, "rope_theta": 10000.0})
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    assert loaded.hf_config.rope_parameters["rope_type"] == rope["rope_type"]
    _check_prefill_then_decode(model_dir, lens=(20, 9), decode_steps=2)


def test_mistral_sliding_window_matches_transformers(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("mistral", sliding_window=4)
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    assert all(layer.self_attn.attn.sliding_window == 4 for layer in loaded.model.model.layers)
    # Contexts well past the window, through both prefill and decode.
    _check_prefill_then_decode(model_dir, lens=(13, 6), decode_steps=3)


def test_sliding_window_changes_the_output(tiny_model_factory) -> None:
    # Guards the test above: if the window were ignored, both models would agree.
    full = load_model(str(tiny_model_factory("mistral")), torch.float32, "cpu")
    windowed = load_model(str(tiny_model_factory("mistral", sliding_window=4)), torch.float32, "cpu")
    logits = []
    for loaded in (full, windowed):
        seqs = _make_seqs([13], loaded.hf_config.vocab_size)
        allocate_kv_cache(loaded.model, 8, BLOCK_SIZE, torch.float32, "cpu")
        logits.append(ModelRunner(loaded.model, BLOCK_SIZE, "cpu").execute(seqs, [13], True, [-1]))
    assert (logits[0] - logits[1]).abs().max() > 1e-2


def test_qwen2_sliding_layers_follow_layer_types(tmp_path) -> None:
    model_dir = build_model_dir(
        tmp_path,
        "qwen2",
        use_sliding_window=True,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention"],
    )
    loaded = load_model(str(model_dir), torch.float32, "cpu")
    windows = [layer.self_attn.attn.sliding_window for layer in loaded.model.model.layers]
    assert windows == [None, 3]
    _check_prefill_then_decode(model_dir, lens=(10, 4), decode_steps=2)


def test_module_tree_is_what_lora_wraps(tiny_model_factory) -> None:
    loaded = load_model(str(tiny_model_factory("qwen3")), torch.float32, "cpu")
    model, cfg = loaded.model, loaded.hf_config
    layer = model.model.layers[0]
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for module in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert isinstance(module, FusedLinear)
        assert module.weight.shape == (module.out_features, module.in_features)
        assert sum(module.output_sizes) == module.out_features
    assert layer.self_attn.qkv_proj.output_sizes == [q, kv, kv]
    assert layer.mlp.gate_up_proj.output_sizes == [cfg.intermediate_size] * 2
    assert layer.self_attn.o_proj.output_sizes == [cfg.hidden_size]
    assert hasattr(layer.self_attn, "q_norm") and hasattr(layer.self_attn, "k_norm")
    assert model.packed_modules_mapping["v_proj"] == ("qkv_proj", 2)
    assert model.packed_modules_mapping["up_proj"] == ("gate_up_proj", 1)


def test_replaced_projection_is_used_at_call_time(tiny_model_factory) -> None:
    """LoRA swaps modules on their parent; the model must pick the new one up."""
    loaded = load_model(str(tiny_model_factory("llama")), torch.float32, "cpu")
    model = loaded.model
    seqs = _make_seqs([5], loaded.hf_config.vocab_size)
    allocate_kv_cache(model, 8, BLOCK_SIZE, torch.float32, "cpu")
    before = ModelRunner(model, BLOCK_SIZE, "cpu").execute(seqs, [5], True, [-1])

    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x) * 0.5

    attn = model.model.layers[1].self_attn
    attn.o_proj = Wrapper(attn.o_proj)
    after = ModelRunner(model, BLOCK_SIZE, "cpu").execute(seqs, [5], True, [-1])
    assert calls and not torch.allclose(before, after)


def test_qwen2_has_qkv_bias_and_no_o_bias(tiny_model_factory) -> None:
    attn = load_model(str(tiny_model_factory("qwen2")), torch.float32, "cpu").model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None


def test_llama_attention_and_mlp_bias_flags(tiny_model_factory) -> None:
    model_dir = tiny_model_factory("llama", attention_bias=True, mlp_bias=True)
    layer = load_model(str(model_dir), torch.float32, "cpu").model.model.layers[0]
    assert layer.self_attn.qkv_proj.bias is not None and layer.self_attn.o_proj.bias is not None
    assert layer.mlp.gate_up_proj.bias is not None and layer.mlp.down_proj.bias is not None
    _check_prefill_then_decode(model_dir, lens=(5, 3), decode_steps=1)


def test_build_model_rejects_unsupported_architecture(tiny_model_factory) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_factory("llama"))
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_model(cfg, torch.float32, "cpu")


def test_dynamic_rope_is_refused(tiny_model_factory) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_factory("llama"))
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="dynamic"):
        build_model(cfg, torch.float32, "cpu")
