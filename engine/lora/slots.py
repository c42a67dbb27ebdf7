"""`LoraSlots`: wrap a model's projections with `LoRALinear` and copy adapters into GPU slots.

The model only promises its fused module names and `packed_modules_mapping`; PEFT short names
(`q_proj`, ...) are mapped to (fused module, output slice) through that mapping, so the model
never imports anything adapter-related. Loading is a copy at a step boundary: the caller (the
adapter registry) decides which slot is free; this class only moves tensors.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Protocol

import torch
from torch import nn

from engine.lora.layers import LoRALinear, SlotWrite
from engine.lora.slot_plan import Region, SlotPlan, build_chunks, flat_source

# The PEFT names Quiver serves, and the fused modules each decoder layer must have.
SHORT_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_NAMES: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class _AdapterWeights(Protocol):
    """What `load` reads from `adapters.weights.LoraWeights` (kept structural: engine owns no adapter types)."""

    name: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    max_rank: int


class LoraSlots:
    """Owns the `LoRALinear` wrappers of every decoder layer and fills/clears their slots."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        mapping: dict[str, tuple[str, int]] = dict(getattr(model, "packed_modules_mapping", {}))
        # short name -> (fused module name, slice index); unpacked names map to themselves.
        self.targets: dict[str, tuple[str, int]] = {s: mapping.get(s, (s, 0)) for s in SHORT_NAMES}
        # fused module name -> short names in slice order
        self._slices: dict[str, list[str]] = {}
        for short, (fused, _index) in sorted(self.targets.items(), key=lambda kv: kv[1]):
            if fused not in FUSED_NAMES:
                raise ValueError(f"packed_modules_mapping sends {short!r} to unknown module {fused!r}")
            self._slices.setdefault(fused, []).append(short)
        for fused, shorts in self._slices.items():
            if [self.targets[s][1] for s in shorts] != list(range(len(shorts))):
                raise ValueError(f"packed_modules_mapping slices of {fused!r} are not 0..n-1: {shorts}")
        self.layers: list[dict[str, LoRALinear]] = [
            {fused: self._wrap(layer, i, fused, num_slots, max_rank) for fused in FUSED_NAMES}
            for i, layer in enumerate(model.model.layers)
        ]
        if not self.layers:
            raise ValueError("the model has no decoder layers to wrap")
        # Every slice's per-slot ranks are rows of one table, so a load sets them in one copy.
        modules = [m for layer in self.layers for m in layer.values()]
        rows = sum(len(m.output_sizes) for m in modules)
        first = modules[0].lora_a
        self._rank_table = torch.zeros(rows, num_slots, dtype=torch.int32, device=first.device)
        self._rank_row: dict[int, int] = {}
        for module in modules:
            for i in range(len(module.output_sizes)):
                row = len(self._rank_row)
                setattr(module, f"lora_rank_{i}", self._rank_table[row])
                self._rank_row[id(module.ranks[i])] = row

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT short name -> (in_features, out_features) of the slice it adapts, for `load_adapter`.

        The checkpoint's (unsharded) shapes: under tensor parallelism `load` slices each rank's part.
        """
        first = self.layers[0]
        shapes = {}
        for short, (fused, index) in self.targets.items():
            base = first[fused].base_layer
            in_features = getattr(base, "full_in_features", base.in_features)
            output_sizes = getattr(base, "full_output_sizes", base.output_sizes)
            shapes[short] = (in_features, output_sizes[index])
        return shapes

    @property
    def plans_enabled(self) -> bool:
        """One-launch promotes: CUDA with Triton, and no tensor-parallel sharding."""
        modules = [m for layer in self.layers for m in layer.values()]
        return self._rank_table.is_cuda and all(m.use_triton and shards_nothing(m.base_layer) for m in modules)

    def prepare(self, weights: _AdapterWeights) -> None:
        """Attach `weights.slot_plan` (loader thread, once the weights are page-locked), so that
        `load` is one DMA and one launch; a no-op where plans are off or the weights are not views
        of one buffer. Pins memory: the caller holds the capture lock (engine/cuda_graphs.py)."""
        if self.plans_enabled:
            weights.slot_plan = self.plan(weights, pin=True)

    def plan(self, weights: _AdapterWeights, pin: bool = False) -> SlotPlan | None:
        """The copy plan of `weights` for this slot layout (engine/lora/slot_plan.py), or None."""
        self._check_modules(weights)
        if getattr(weights, "magnitudes", None):
            return None  # DoRA's scaling needs the base weights: such adapters take the plain load
        source = flat_source([t for pair in weights.modules.values() for t in pair])
        if source is None or source.dtype != self._slot_dtype():
            return None
        regions: list[Region] = []
        marks = []
        column = [0] * self._rank_table.shape[0]
        for layer_idx, layer in enumerate(self.layers):
            for fused, shorts in self._slices.items():
                module = layer[fused]
                r = module.max_rank
                lora_a = module.lora_a
                for i, short in enumerate(shorts):
                    pair = weights.modules.get((layer_idx, short))
                    a, b = pair if pair is not None else (None, None)
                    if pair is not None:
                        module._check_pair(i, *pair)
                    b_stack = module.b_stacks[i]
                    regions.append(Region(lora_a.view(-1), i * r * module.in_features, lora_a.stride(0),
                                          r * module.in_features, module.in_features, a))
                    regions.append(Region(b_stack.view(-1), 0, b_stack.stride(0), b_stack[0].numel(), r, b))
                    column[self._rank_row[id(module.ranks[i])]] = 0 if a is None else a.shape[0]
                    marks.append((module, i, pair is not None))
        rank_column = torch.tensor(column, dtype=torch.int32)
        return SlotPlan(self, source, build_chunks(regions, source, pin),
                        rank_column.pin_memory() if pin else rank_column, tuple(marks))

    def load(self, slot: int, weights: _AdapterWeights) -> None:
        """Copy `weights` into `slot` of every layer; modules it does not target get zeros."""
        self._check_slot(slot)
        plan = getattr(weights, "slot_plan", None)
        if plan is not None and plan.owner is self and self.plans_enabled:
            self._load_planned(slot, plan)
            return
        self._check_modules(weights)
        magnitudes = getattr(weights, "magnitudes", None) or {}
        if magnitudes and not all(shards_nothing(m.base_layer) for layer in self.layers for m in layer.values()):
            raise ValueError(f"adapter {weights.name!r} is a DoRA adapter; DoRA is not served across "
                             "tensor-parallel ranks")
        write = SlotWrite()
        dora = []
        for layer_idx, layer in enumerate(self.layers):
            for fused, shorts in self._slices.items():
                module = layer[fused]
                pairs = [weights.modules.get((layer_idx, s)) for s in shorts]
                shard = getattr(module.base_layer, "shard_lora", None)
                if shard is not None and not shards_nothing(module.base_layer):  # keep this rank's part
                    pairs = [None if p is None else shard(i, *p) for i, p in enumerate(pairs)]
                write.extend(module.plan_lora(slot, pairs))
                mags = [magnitudes.get((layer_idx, s)) for s in shorts]
                if any(m is not None for m in mags):
                    dora.append((module, pairs, mags))
                else:
                    module.clear_dora(slot)
        column = [0] * self._rank_table.shape[0]
        for ranks, _, rank in write.ranks:
            column[self._rank_row[id(ranks)]] = rank
        write.ranks = []
        write.apply()
        on_cuda = self._rank_table.is_cuda
        self._rank_table[:, slot].copy_(torch.tensor(column, dtype=torch.int32, pin_memory=on_cuda),
                                        non_blocking=on_cuda)
        for module, pairs, mags in dora:  # needs the base weights: on the device, once per load
            module.set_dora(slot, pairs, mags)

    @torch.no_grad()
    def _load_planned(self, slot: int, plan: SlotPlan) -> None:
        device = self._rank_table.device
        kernel = _slot_copy_kernel()
        for chunk in plan.chunks:
            staged = plan.source[chunk.lo : chunk.hi].to(device, non_blocking=True)
            if staged.numel() == 0:  # only zero regions: any valid pointer will do
                staged = self._rank_table.new_zeros(1, dtype=plan.source.dtype)
            kernel.slot_copy(staged, chunk.desc.to(device, non_blocking=True), slot, chunk.max_numel)
        self._rank_table[:, slot].copy_(plan.rank_column, non_blocking=True)
        for module, index, targeted in plan.marks:
            module._mark(index, slot, targeted)
        for layer in self.layers:
            for module in layer.values():
                module.clear_dora(slot)

    def _slot_dtype(self) -> torch.dtype:
        return self.layers[0][FUSED_NAMES[0]].lora_a.dtype

    def _check_modules(self, weights: _AdapterWeights) -> None:
        if weights.max_rank > self.max_rank:
            raise ValueError(
                f"adapter {weights.name!r} has rank {weights.max_rank} > max_rank {self.max_rank}"
            )
        for layer_idx, short in weights.modules:
            if short not in self.targets or not 0 <= layer_idx < self.num_layers:
                raise ValueError(
                    f"adapter {weights.name!r} has weights for unknown module ({layer_idx}, {short!r})"
                )

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers:
            for module in layer.values():
                module.reset_lora(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")

    def _wrap(
        self, layer: nn.Module, layer_idx: int, fused: str, num_slots: int, max_rank: int
    ) -> LoRALinear:
        parent, base = _find_child(layer, fused, layer_idx)
        if isinstance(base, LoRALinear):
            raise ValueError(f"layer {layer_idx} {fused!r} is already wrapped")
        expected = len(self._slices.get(fused, []))
        if len(base.output_sizes) != expected:
            raise ValueError(
                f"layer {layer_idx} {fused!r} has output_sizes {base.output_sizes}; the packed mapping "
                f"needs {expected} slices ({self._slices.get(fused)})"
            )
        wrapped = LoRALinear(base, num_slots, max_rank)
        setattr(parent, fused, wrapped)
        return wrapped


def _find_child(layer: nn.Module, name: str, layer_idx: int) -> tuple[nn.Module, nn.Module]:
    """(parent, module) of the single submodule called `name` (e.g. `self_attn.qkv_proj`)."""
    found = [
        (layer.get_submodule(path.rpartition(".")[0]), module)
        for path, module in layer.named_modules()
        if path.rpartition(".")[2] == name
    ]
    if len(found) != 1:
        raise ValueError(f"layer {layer_idx}: expected exactly one {name!r} submodule, found {len(found)}")
    return found[0]


def shards_nothing(base: nn.Module) -> bool:
    """The layer holds whole slices (one device, or a world of one): adapters need no slicing."""
    return (getattr(base, "full_in_features", base.in_features) == base.in_features
            and list(getattr(base, "full_output_sizes", base.output_sizes)) == list(base.output_sizes))


@functools.cache
def _slot_copy_kernel() -> ModuleType:
    # Imported on first CUDA use: Triton is not installed where only the CPU path runs.
    from engine.kernels import triton_slot_copy

    return triton_slot_copy
