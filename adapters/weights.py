"""Load one PEFT LoRA adapter's safetensors into validated, scale-folded (A, B) pairs on the CPU.

Folding `scaling` into B at load time means the kernels compute `x @ A.T @ B.T` with no
per-adapter scalar, so adapters of any rank/alpha mix in one batch. Nothing here unpickles:
`.bin`/`.pt` weights can run code when loaded, so they are refused.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open

from adapters.errors import (
    AdapterNotFoundError,
    AdapterWeightsError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from adapters.files import confined
from adapters.peft_format import MODULE_PARENTS, WEIGHTS_NAME, AdapterSpec, module_path, read_adapter_spec

_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A[.default].weight; the optional infix is
# an adapter name some exporters leave in, the optional prefix is PeftModel's wrapper.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)"
    r"\.(?:lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight|(?P<magnitude>lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?)$"
)


@dataclass
class LoraWeights:
    """One loaded adapter on the CPU: per (layer, PEFT short name), A [r, in] and B*scaling [out, r]."""

    name: str
    spec: AdapterSpec
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    max_rank: int
    size_bytes: int
    # DoRA (use_dora): per (layer, short name) the magnitude vector m [out]. The served output of
    # such a module is bias + m / ||W + B*scaling A||_row * (W x + B*scaling A x), as PEFT computes it.
    magnitudes: dict[tuple[int, str], torch.Tensor] = dataclasses.field(default_factory=dict)
    # Set by the engine when the weights enter host memory: how a promote places them in a GPU
    # slot (engine/lora/slot_plan.py). Opaque here.
    slot_plan: object | None = None


def load_adapter(
    adapter_dir: Path,
    name: str,
    expected_shapes: dict[str, tuple[int, int]] | None,
    num_layers: int | None,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    root: Path | str | None = None,
) -> LoraWeights:
    """Read, validate and fold an adapter.

    expected_shapes: short name -> (in_features, out_features) of the base model's module;
    None skips the shape checks (and `num_layers=None` the layer-range check).
    root: the adapter root the directory came from; every file read must resolve inside it.
    """
    adapter_dir = Path(adapter_dir)
    spec = read_adapter_spec(adapter_dir, name, root)
    tensors = _read_tensors(adapter_dir, name, root)
    pairs, found_magnitudes = _pair_up(tensors, spec, name, num_layers)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, short), (a, b) in sorted(pairs.items()):
        path = module_path(layer, short)
        rank, scaling = spec.scale_for(path)
        in_out = None if expected_shapes is None else _expect(expected_shapes, short, name, path)
        _check_pair(name, path, a, b, rank, max_rank, in_out)
        b_scaled = (b.to(torch.float32) * scaling).to(dtype)
        modules[(layer, short)] = (a.to(dtype).contiguous(), b_scaled.contiguous())
        if spec.use_dora:
            magnitudes[(layer, short)] = _magnitude(found_magnitudes.pop((layer, short), None), b.shape[0], name, path)
    if found_magnitudes:
        extra = module_path(*sorted(found_magnitudes)[0])
        why = "use_dora is false" if not spec.use_dora else "it has no lora_A/lora_B"
        raise AdapterWeightsError(name, f"{extra}: a DoRA magnitude vector, but {why}")
    size = sum(t.numel() * t.element_size() for pair in modules.values() for t in pair)
    size += sum(m.numel() * m.element_size() for m in magnitudes.values())
    return LoraWeights(
        name=name,
        spec=spec,
        modules=modules,
        max_rank=max(a.shape[0] for a, _ in modules.values()),
        size_bytes=size,
        magnitudes=magnitudes,
    )


def _magnitude(m: torch.Tensor | None, out_features: int, name: str, path: str) -> torch.Tensor:
    """A DoRA module's magnitude vector, checked: [out] and finite; kept in float32."""
    if m is None:
        raise AdapterWeightsError(name, f"{path}: use_dora is true but its lora_magnitude_vector is missing")
    if m.dim() != 1 or m.shape[0] != out_features:
        raise AdapterWeightsError(
            name, f"{path}: lora_magnitude_vector is {list(m.shape)}; expected [{out_features}] (lora_B's rows)"
        )
    if not _all_finite(m):
        raise AdapterWeightsError(name, f"{path}: lora_magnitude_vector has non-finite values (NaN or inf)")
    return m.to(torch.float32).contiguous()


def _read_tensors(adapter_dir: Path, name: str, root: Path | str | None) -> dict[str, torch.Tensor]:
    path = confined(adapter_dir / WEIGHTS_NAME, root, name)
    if not path.is_file():
        pickled = [p for p in _PICKLE_NAMES if (adapter_dir / p).is_file()]
        if pickled:
            raise UnsafeAdapterFormatError(
                name,
                f"found {pickled[0]} but no {WEIGHTS_NAME}; pickle weights are refused; "
                "convert to safetensors (e.g. save_pretrained(..., safe_serialization=True))",
            )
        raise AdapterNotFoundError(name, f"{WEIGHTS_NAME} is missing from {str(adapter_dir)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterWeightsError(
            name, f"{WEIGHTS_NAME} is corrupt or not a safetensors file: {exc}"
        ) from exc


def _pair_up(
    tensors: dict[str, torch.Tensor], spec: AdapterSpec, name: str, num_layers: int | None
) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], dict[tuple[int, str], torch.Tensor]]:
    """(A, B) per module, and the DoRA magnitude vectors found (checked by the caller)."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            _refuse_key(key, name)
        layer, parent, short = int(match["layer"]), match["parent"], match["module"]
        path = f"model.layers.{layer}.{parent}.{short}"
        if MODULE_PARENTS.get(short) != parent:
            raise AdapterWeightsError(
                name,
                f"tensor {key!r} targets {path!r}; expected one of {sorted(MODULE_PARENTS)} "
                "under self_attn (q/k/v/o) or mlp (gate/up/down)",
            )
        if short not in spec.target_modules:
            raise AdapterWeightsError(
                name, f"tensor {key!r} targets {path!r} but target_modules is {sorted(spec.target_modules)}"
            )
        if num_layers is not None and layer >= num_layers:
            raise AdapterWeightsError(
                name,
                f"tensor {key!r}: layer index {layer} is out of range; the base model has "
                f"{num_layers} layers (expected 0..{num_layers - 1})",
            )
        if spec.layers_to_transform is not None and layer not in spec.layers_to_transform:
            raise AdapterWeightsError(
                name,
                f"tensor {key!r}: layer {layer} is not in layers_to_transform "
                f"{sorted(spec.layers_to_transform)}",
            )
        if not tensor.is_floating_point():
            raise AdapterWeightsError(
                name, f"tensor {key!r} has dtype {tensor.dtype}; expected a float dtype"
            )
        if match["magnitude"]:
            if (layer, short) in magnitudes:
                raise AdapterWeightsError(name, f"{path}: lora_magnitude_vector appears twice (last: {key!r})")
            magnitudes[(layer, short)] = tensor
            continue
        slot = found.setdefault((layer, short), {})
        if match["which"] in slot:
            raise AdapterWeightsError(name, f"{path}: lora_{match['which']} appears twice (last: {key!r})")
        slot[match["which"]] = tensor
    if not found:
        raise AdapterWeightsError(name, f"{WEIGHTS_NAME} holds no LoRA weights (keys: {sorted(tensors)[:5]})")
    pairs = {}
    for (layer, short), ab in found.items():
        missing = [f"lora_{w}" for w in "AB" if w not in ab]
        if missing:
            raise AdapterWeightsError(name, f"{module_path(layer, short)}: {missing[0]} is missing")
        pairs[(layer, short)] = (ab["A"], ab["B"])
    return pairs, magnitudes


def _refuse_key(key: str, name: str) -> NoReturn:
    if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
        raise UnsupportedAdapterError(name, f"tensor {key!r}: LoRA on embeddings or lm_head is not supported")
    raise AdapterWeightsError(
        name,
        f"unexpected tensor {key!r}; expected keys like "
        "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
    )


def _expect(expected_shapes: dict[str, tuple[int, int]], short: str, name: str, path: str) -> tuple[int, int]:
    if short not in expected_shapes:
        raise AdapterWeightsError(
            name, f"{path}: the base model has no {short!r} module (it has {sorted(expected_shapes)})"
        )
    return expected_shapes[short]


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction and no temporary (min and max propagate NaN; inf shows in one of them):
    `isfinite(t).all()` allocated a mask per tensor and took most of a llama-8b adapter's load."""
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_pair(
    name: str,
    path: str,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    max_rank: int,
    in_out: tuple[int, int] | None,
) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterWeightsError(
            name, f"{path}: expected 2-D lora_A and lora_B, got shapes {list(a.shape)} and {list(b.shape)}"
        )
    if a.shape[0] != rank:
        raise AdapterWeightsError(
            name, f"{path}: lora_A has rank {a.shape[0]} but adapter_config gives this module rank {rank}"
        )
    if b.shape[1] != a.shape[0]:
        raise AdapterWeightsError(
            name, f"{path}: lora_B is {list(b.shape)}; expected [out, {a.shape[0]}] to match lora_A's rank"
        )
    if rank > max_rank:
        raise AdapterWeightsError(name, f"{path}: rank {rank} exceeds the server's max_rank {max_rank}")
    if in_out is not None:
        in_features, out_features = in_out
        if a.shape[1] != in_features:
            raise AdapterWeightsError(
                name,
                f"{path}: lora_A is {list(a.shape)}; expected in_features {in_features}, got {a.shape[1]}",
            )
        if b.shape[0] != out_features:
            raise AdapterWeightsError(
                name,
                f"{path}: lora_B is {list(b.shape)}; expected out_features {out_features}, got {b.shape[0]}",
            )
    for label, t in (("lora_A", a), ("lora_B", b)):
        if t.numel() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterWeightsError(name, f"{path}: {label} has {bad} non-finite values (NaN or inf)")
