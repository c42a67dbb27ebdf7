from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adapters.peft_format import MODULE_PARENTS
from adapters.weights import load_adapter
from engine.context import ForwardContext, LoraContext, set_context
from engine.lora.layers import LoRALinear
from engine.lora.slots import LoraSlots
from engine.models.layers import FusedLinear

HIDDEN, Q, KV, INTER = 16, 16, 8, 24
SHAPES = {
    "q_proj": (HIDDEN, Q),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (Q, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
FUSED_OF = {s: PACKED.get(s, (s, 0)) for s in SHAPES}
SEGMENTS = [(0, 2, -1), (2, 5, 0), (5, 7, 2), (7, 10, 1)]  # 10 tokens: base, slot 0, slot 2, slot 1


def fused(in_features: int, sizes: list[int], gen: torch.Generator, bias: bool = False) -> FusedLinear:
    module = FusedLinear(in_features, sizes, bias=bias, dtype=torch.float32)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / in_features**0.5)
        if bias:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return module


def fake_model(num_layers: int = 2, seed: int = 0, modules=None) -> nn.Module:
    """The model contract only: model.model.layers[i].{self_attn,mlp}.<fused> and packed_modules_mapping."""
    gen = torch.Generator().manual_seed(seed)
    layers = nn.ModuleList()
    for i in range(num_layers):
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Module(), nn.Module()
        if modules is None:
            layer.self_attn.qkv_proj = fused(HIDDEN, [Q, KV, KV], gen, bias=True)
            layer.self_attn.o_proj = fused(Q, [HIDDEN], gen)
            layer.mlp.gate_up_proj = fused(HIDDEN, [INTER, INTER], gen)
            layer.mlp.down_proj = fused(INTER, [HIDDEN], gen)
        else:
            for name, module in modules(i).items():
                setattr(layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp, name, module)
        layers.append(layer)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = layers
    model.packed_modules_mapping = dict(PACKED)
    return model


def random_adapter(targets: dict[str, int], gen: torch.Generator, layers=(0, 1), name: str = "x"):
    """A LoraWeights-shaped object: {(layer, short): (A [r, in], B [out, r])} for short -> rank."""
    modules = {}
    for layer in layers:
        for short, rank in targets.items():
            in_f, out_f = SHAPES[short]
            modules[(layer, short)] = (
                torch.randn(rank, in_f, generator=gen),
                torch.randn(out_f, rank, generator=gen),
            )
    return SimpleNamespace(name=name, modules=modules, max_rank=max(targets.values()))


@pytest.fixture
def lora_context():
    def set_lora(seg_bounds: list[tuple[int, int, int]], is_prefill: bool = True) -> None:
        num_tokens = seg_bounds[-1][1]
        token_slots = torch.full((num_tokens,), -1, dtype=torch.int64)
        for start, end, slot in seg_bounds:
            token_slots[start:end] = slot
        lora = LoraContext(
            token_slots=token_slots,
            seg_starts=torch.tensor([s for s, _, _ in seg_bounds] + [num_tokens]),
            seg_slots=torch.tensor([slot for _, _, slot in seg_bounds]),
            seg_bounds=seg_bounds,
            any_lora=any(slot >= 0 for _, _, slot in seg_bounds),
        )
        empty = torch.zeros(0, dtype=torch.int32)
        set_context(
            ForwardContext(is_prefill, empty.long(), empty, empty, empty.view(0, 0), 0, 0, [], [], 16, lora)
        )

    yield set_lora
    set_context(None)


def dense_expected(slots: LoraSlots, adapters: dict[int, SimpleNamespace], layer: int, fused_name: str, x):
    """base(x) plus, per segment, x @ A.T @ B.T for each slice the segment's adapter targets."""
    module = slots.layers[layer][fused_name]
    y = module.base_layer(x).clone()
    offsets = module.slice_offsets
    for start, end, slot in SEGMENTS:
        if slot < 0:
            continue
        for short, (name, index) in FUSED_OF.items():
            pair = adapters[slot].modules.get((layer, short))
            if name == fused_name and pair is not None:
                a, b = pair
                cols = slice(offsets[index], offsets[index] + module.output_sizes[index])
                y[start:end, cols] += x[start:end] @ a.T @ b.T
    return y


def test_wraps_every_projection_with_passthroughs():
    model = fake_model()
    bases = [
        {"qkv_proj": layer.self_attn.qkv_proj, "down_proj": layer.mlp.down_proj}
        for layer in model.model.layers
    ]
    slots = LoraSlots(model, num_slots=3, max_rank=8)
    assert slots.num_layers == 2 and slots.expected_shapes() == SHAPES
    for i, layer in enumerate(model.model.layers):
        wrapped = layer.self_attn.qkv_proj
        assert isinstance(wrapped, LoRALinear) and wrapped is slots.layers[i]["qkv_proj"]
        assert wrapped.base_layer is bases[i]["qkv_proj"] and wrapped.weight is bases[i]["qkv_proj"].weight
        assert (wrapped.in_features, wrapped.out_features, wrapped.output_sizes) == (
            HIDDEN,
            Q + 2 * KV,
            [Q, KV, KV],
        )
        assert [tuple(a.shape) for a in wrapped.a_stacks] == [(3, 8, HIDDEN)] * 3
        assert [tuple(b.shape) for b in wrapped.b_stacks] == [(3, Q, 8), (3, KV, 8), (3, KV, 8)]
        assert (
            isinstance(layer.mlp.down_proj, LoRALinear)
            and layer.mlp.down_proj.base_layer is bases[i]["down_proj"]
        )
        assert layer.mlp.down_proj.output_sizes == [HIDDEN]
    assert not any("lora_" in key for key in model.state_dict())  # slots are not checkpoint state
    with pytest.raises(ValueError, match="already wrapped"):
        LoraSlots(model, num_slots=3, max_rank=8)


def test_no_context_or_no_lora_tokens_gives_base_output(lora_context):
    model = fake_model()
    base = model.model.layers[0].self_attn.qkv_proj
    slots = LoraSlots(model, num_slots=2, max_rank=4)
    slots.load(0, random_adapter({"q_proj": 4}, torch.Generator().manual_seed(1)))
    x = torch.randn(4, HIDDEN)
    wrapped = slots.layers[0]["qkv_proj"]
    assert torch.equal(wrapped(x), base(x))
    lora_context([(0, 4, -1)])
    assert torch.equal(wrapped(x), base(x))
    lora_context([(0, 4, 0)])
    assert not torch.allclose(wrapped(x), base(x))


@pytest.mark.parametrize("is_prefill", [True, False], ids=["sgmv", "bgmv"])
def test_mixed_batch_equals_per_segment_dense(lora_context, is_prefill):
    gen = torch.Generator().manual_seed(2)
    model = fake_model()
    slots = LoraSlots(model, num_slots=3, max_rank=8)
    adapters = {
        0: random_adapter({"q_proj": 2, "v_proj": 2}, gen),
        1: random_adapter({"k_proj": 4, "gate_proj": 4, "down_proj": 4}, gen, layers=(1,)),
        2: random_adapter({s: 8 for s in SHAPES}, gen),
    }
    for slot, weights in adapters.items():
        slots.load(slot, weights)
    lora_context(SEGMENTS, is_prefill=is_prefill)
    for layer in range(2):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            in_features = slots.layers[layer][name].in_features
            x = torch.randn(10, in_features, generator=gen)
            got = slots.layers[layer][name](x)
            torch.testing.assert_close(
                got, dense_expected(slots, adapters, layer, name, x), rtol=1e-5, atol=1e-5
            )
            assert torch.equal(got[:2], slots.layers[layer][name].base_layer(x)[:2])


def test_sgmv_and_bgmv_paths_agree_on_3d_input(lora_context):
    gen = torch.Generator().manual_seed(3)
    slots = LoraSlots(fake_model(), num_slots=3, max_rank=8)
    for slot, rank in enumerate((8, 3, 5)):
        slots.load(slot, random_adapter({s: rank for s in SHAPES}, gen))
    x = torch.randn(2, 5, HIDDEN, generator=gen)  # any leading shape flattens to tokens
    wrapped = slots.layers[1]["gate_up_proj"]
    lora_context(SEGMENTS, is_prefill=True)
    sgmv = wrapped(x)
    lora_context(SEGMENTS, is_prefill=False)
    bgmv = wrapped(x)
    assert sgmv.shape == (2, 5, 2 * INTER)
    torch.testing.assert_close(sgmv, bgmv, rtol=1e-5, atol=1e-5)


def test_set_then_reset_gives_base_output(lora_context):
    gen = torch.Generator().manual_seed(4)
    base = fused(HIDDEN, [Q, KV, KV], gen, bias=True)
    layer = LoRALinear(base, num_slots=2, max_rank=4)
    pairs = [
        (torch.randn(4, HIDDEN, generator=gen), torch.randn(size, 4, generator=gen)) for size in (Q, KV, KV)
    ]
    layer.set_lora(1, pairs)
    lora_context([(0, 3, 1), (3, 6, 0)])
    x = torch.randn(6, HIDDEN, generator=gen)
    assert not torch.allclose(layer(x)[:3], base(x)[:3])
    layer.reset_lora(1)
    assert torch.equal(layer(x), base(x))
    assert all(not a.any() for a in layer.a_stacks) and all(not b.any() for b in layer.b_stacks)


@pytest.mark.parametrize("is_prefill", [True, False])
def test_low_rank_in_max_rank_64_buffer_equals_exact_rank(lora_context, is_prefill):
    gen = torch.Generator().manual_seed(5)
    base = fused(HIDDEN, [INTER, INTER], gen)
    layer = LoRALinear(base, num_slots=2, max_rank=64)
    gate = (torch.randn(3, HIDDEN, generator=gen), torch.randn(INTER, 3, generator=gen))
    layer.set_lora(0, [gate, None])  # the adapter targets gate only: up slice stays zero
    lora_context([(0, 7, 0)], is_prefill=is_prefill)
    x = torch.randn(7, HIDDEN, generator=gen)
    expected = base(x)
    expected[:, :INTER] += (x @ gate[0].T) @ gate[1].T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x)[:, INTER:], base(x)[:, INTER:])


def test_load_overwrites_stale_slices_without_allocating():
    gen = torch.Generator().manual_seed(6)
    slots = LoraSlots(fake_model(), num_slots=2, max_rank=8)
    ptrs = [
        t.data_ptr() for layer in slots.layers for m in layer.values() for t in (*m.a_stacks, *m.b_stacks)
    ]
    slots.load(1, random_adapter({"q_proj": 8, "v_proj": 8, "down_proj": 8}, gen))
    slots.load(1, random_adapter({"k_proj": 2}, gen, layers=(0,)))
    qkv0, qkv1 = slots.layers[0]["qkv_proj"], slots.layers[1]["qkv_proj"]
    a_q, a_k, a_v = qkv0.a_stacks
    assert not a_q[1].any() and not a_v[1].any() and a_k[1, :2].any() and not a_k[1, 2:].any()
    assert not any(t[1].any() for t in (*qkv1.a_stacks, *slots.layers[0]["down_proj"].b_stacks))
    slots.clear(1)
    assert not a_k[1].any()
    after = [
        t.data_ptr() for layer in slots.layers for m in layer.values() for t in (*m.a_stacks, *m.b_stacks)
    ]
    assert after == ptrs


def test_invalid_slot_operations_raise():
    gen = torch.Generator().manual_seed(7)
    slots = LoraSlots(fake_model(), num_slots=2, max_rank=4)
    layer = slots.layers[0]["qkv_proj"]
    ok = [(torch.randn(2, HIDDEN), torch.randn(size, 2)) for size in (Q, KV, KV)]
    with pytest.raises(ValueError, match="slot 2 out of range"):
        layer.set_lora(2, ok)
    with pytest.raises(ValueError, match="expected 3 slices, got 2"):
        layer.set_lora(0, ok[:2])
    with pytest.raises(ValueError, match=r"slice 1: B must be \[8, 2\]"):
        layer.set_lora(0, [ok[0], (ok[1][0], torch.randn(Q, 2)), None])
    with pytest.raises(ValueError, match="rank 6 exceeds max_rank 4"):
        layer.set_lora(0, [(torch.randn(6, HIDDEN), torch.randn(Q, 6)), None, None])
    with pytest.raises(ValueError, match="rank 8 > max_rank 4"):
        slots.load(0, random_adapter({"q_proj": 8}, gen))
    with pytest.raises(ValueError, match=r"unknown module \(5, 'q_proj'\)"):
        slots.load(0, random_adapter({"q_proj": 2}, gen, layers=(5,)))
    with pytest.raises(ValueError, match="slot -1 out of range"):
        slots.clear(-1)


# --- oracle: PEFT's own mixed-batch forward (adapter_names=) on a real tiny model -------------------


def fused_from_hf(hf_model) -> nn.Module:
    """Our model contract built from an HF model's weights (qkv and gate/up concatenated)."""

    def modules(i):
        attn, mlp = hf_model.model.layers[i].self_attn, hf_model.model.layers[i].mlp

        def cat(*linears):
            out = FusedLinear(
                linears[0].in_features,
                [m.out_features for m in linears],
                bias=linears[0].bias is not None,
                dtype=torch.float32,
            )
            with torch.no_grad():
                out.weight.copy_(torch.cat([m.weight for m in linears]))
                if out.bias is not None:
                    out.bias.copy_(torch.cat([m.bias for m in linears]))
            return out

        return {
            "qkv_proj": cat(attn.q_proj, attn.k_proj, attn.v_proj),
            "o_proj": cat(attn.o_proj),
            "gate_up_proj": cat(mlp.gate_proj, mlp.up_proj),
            "down_proj": cat(mlp.down_proj),
        }

    return fake_model(num_layers=len(hf_model.model.layers), modules=modules)


def test_mixed_batch_matches_peft_adapter_names(tiny_model_factory, tiny_adapter_factory, lora_context):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory("qwen2")  # q/k/v bias in the fused base
    dirs = {
        "a": tiny_adapter_factory(model_dir, rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"), seed=11),
        "b": tiny_adapter_factory(
            model_dir,
            rank=8,
            alpha=8.0,
            use_rslora=True,
            seed=12,
            target_modules=("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            rank_pattern={"layers.1.mlp.down_proj": 2},
        ),
        "c": tiny_adapter_factory(
            model_dir,
            rank=4,
            alpha=16.0,
            seed=13,
            target_modules=tuple(SHAPES),
            alpha_pattern={"v_proj": 2.0, "layers.0.self_attn.o_proj": 32.0},
        ),
    }
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours = fused_from_hf(hf)
    peft_model = PeftModel.from_pretrained(hf, dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(dirs[name], adapter_name=name)
    peft_model.eval()

    slots = LoraSlots(ours, num_slots=3, max_rank=8)
    shapes, slot_of = slots.expected_shapes(), {"a": 0, "c": 1, "b": 2}
    for name, slot in slot_of.items():
        slots.load(slot, load_adapter(dirs[name], name, shapes, slots.num_layers, max_rank=8))

    rows = ["__base__", "a", "c", "b"]  # 4 sequences of 3 tokens: segments base, 0, 1, 2
    lora_context([(3 * i, 3 * i + 3, slot_of.get(n, -1)) for i, n in enumerate(rows)])
    gen = torch.Generator().manual_seed(8)
    layers = peft_model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        for fused_name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            shorts = sorted(
                (s for s, (f, _) in FUSED_OF.items() if f == fused_name), key=lambda s: FUSED_OF[s][1]
            )
            peft_modules = [getattr(getattr(layer, MODULE_PARENTS[s]), s) for s in shorts]
            x = torch.randn(4, 3, peft_modules[0].in_features, generator=gen)
            with torch.no_grad():
                want = torch.cat(
                    [m(x, adapter_names=rows) if isinstance(m, LoraLayer) else m(x) for m in peft_modules],
                    dim=-1,
                )
                got = slots.layers[i][fused_name](x.reshape(12, -1))
            torch.testing.assert_close(got, want.reshape(12, -1), rtol=1e-5, atol=1e-5)
