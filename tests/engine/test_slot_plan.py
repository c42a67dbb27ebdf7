"""Copy plans (engine/lora/slot_plan.py): a planned promote leaves every slot buffer, rank and
live slice exactly as the module-by-module load does; on a GPU, through the Triton kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapters.loader import pin_all
from engine.lora import slot_plan
from engine.lora.slot_plan import apply_reference
from engine.lora.slots import LoraSlots
from tests.engine.test_lora_layers import SHAPES, fake_model, random_adapter


def _flat(weights: SimpleNamespace, dtype: torch.dtype = torch.float32, pin: bool = False) -> SimpleNamespace:
    """The adapter's tensors as views of one buffer, as the loader leaves them."""
    modules = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in weights.modules.items()}
    return SimpleNamespace(name=weights.name, modules=pin_all(modules, pin=pin), max_rank=weights.max_rank,
                           slot_plan=None)


def _state(slots: LoraSlots) -> list[torch.Tensor]:
    buffers = [t.clone() for layer in slots.layers for m in layer.values() for t in (m.lora_a, *m.b_stacks)]
    return [*buffers, slots._rank_table.clone()]


def _live(slots: LoraSlots) -> list[tuple[list[int], int]]:
    return [(m.live_slices, m.live_version) for layer in slots.layers for m in layer.values()]


def _two_slot_sets(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[LoraSlots, LoraSlots]:
    pair = []
    for _ in range(2):
        model = fake_model().to(device=device, dtype=dtype)
        pair.append(LoraSlots(model, num_slots=3, max_rank=8))
    return pair[0], pair[1]


ADAPTERS = {
    "stale": ({s: 8 for s in SHAPES}, (0, 1)),
    "mixed": ({"q_proj": 2, "v_proj": 5, "down_proj": 8, "up_proj": 3}, (0, 1)),
    "one_layer": ({"k_proj": 4}, (1,)),
}


@pytest.mark.parametrize("stage_bytes", [slot_plan.STAGE_MAX_BYTES, 256], ids=["one_chunk", "many_chunks"])
def test_a_planned_load_equals_the_module_by_module_load(monkeypatch, stage_bytes):
    monkeypatch.setattr(slot_plan, "STAGE_MAX_BYTES", stage_bytes)
    gen = torch.Generator().manual_seed(11)
    adapters = {k: _flat(random_adapter(t, gen, layers=layers, name=k)) for k, (t, layers) in ADAPTERS.items()}
    planned, plain = _two_slot_sets()
    for name in ("stale", "mixed", "one_layer"):  # each over the last: stale rows must be cleared
        plain.load(1, adapters[name])
        plan = planned.plan(adapters[name])
        assert plan is not None and plan.owner is planned
        assert (len(plan.chunks) > 1) == (stage_bytes == 256)
        apply_reference(plan, 1)
        for module, index, targeted in plan.marks:
            module._mark(index, 1, targeted)
        planned._rank_table[:, 1] = plan.rank_column
        for got, want in zip(_state(planned), _state(plain), strict=True):
            assert torch.equal(got, want)
        assert _live(planned) == _live(plain)


def test_weights_that_are_not_views_of_one_buffer_get_no_plan():
    gen = torch.Generator().manual_seed(12)
    slots, _ = _two_slot_sets()
    assert slots.plan(random_adapter({"q_proj": 4}, gen)) is None
    assert slots.plan(_flat(random_adapter({"q_proj": 4}, gen), dtype=torch.float64)) is None  # not the slot dtype


def test_a_plan_checks_shapes_like_the_plain_load():
    gen = torch.Generator().manual_seed(13)
    slots, _ = _two_slot_sets()
    bad = random_adapter({"q_proj": 4}, gen)
    a, b = bad.modules[(0, "q_proj")]
    bad.modules[(0, "q_proj")] = (a[:, :-1].contiguous(), b)
    with pytest.raises(ValueError, match="A must be"):
        slots.plan(_flat(bad))


@pytest.mark.gpu
@pytest.mark.parametrize("stage_bytes", [slot_plan.STAGE_MAX_BYTES, 4096], ids=["one_chunk", "many_chunks"])
def test_the_kernel_promote_equals_the_module_by_module_load_on_the_gpu(monkeypatch, stage_bytes):
    monkeypatch.setattr(slot_plan, "STAGE_MAX_BYTES", stage_bytes)
    gen = torch.Generator().manual_seed(14)
    planned, plain = _two_slot_sets("cuda", torch.bfloat16)
    assert planned.plans_enabled
    for name, (targets, layers) in ADAPTERS.items():
        weights = _flat(random_adapter(targets, gen, layers=layers, name=name), torch.bfloat16, pin=True)
        planned.prepare(weights)
        assert weights.slot_plan is not None
        for slot in (2, 0):
            planned.load(slot, weights)
            plain.load(slot, weights)
        torch.cuda.synchronize()
        for got, want in zip(_state(planned), _state(plain), strict=True):
            assert torch.equal(got, want)
        assert _live(planned) == _live(plain)


def test_a_real_model_on_one_device_shards_nothing_so_promotes_can_be_planned():
    from engine.lora.slots import shards_nothing
    from engine.models import build_model
    from tests.factories import tiny_config

    cfg = tiny_config("llama", vocab_size=64)
    cfg.architectures = ["LlamaForCausalLM"]
    model = build_model(cfg, torch.float32, "cpu")
    slots = LoraSlots(model, num_slots=2, max_rank=4)
    assert all(shards_nothing(m.base_layer) for layer in slots.layers for m in layer.values())
