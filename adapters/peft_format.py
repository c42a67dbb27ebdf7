"""Parse a PEFT LoRA `adapter_config.json` into an `AdapterSpec`, refusing what we cannot serve.

PEFT's own `LoraConfig` validates the fields, and PEFT's matching rules decide which modules
are targeted and which rank/alpha each gets, so an adapter means here exactly what it meant when
it was trained. The rules run in `adapters.module_match`, under a time bound, because their
patterns come from the adapter. peft is imported lazily: it is slow to import and only needed
when an adapter is registered, never on the serving path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    UnsupportedAdapterError,
)
from adapters.files import confined
from adapters.module_match import ModuleSelector, PatternBudget, check_pattern_key, pattern_key

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # real configs are a few KB

# PEFT short name -> the submodule of a decoder layer that holds it (HF Llama-family naming).
MODULE_PARENTS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SUPPORTED_TARGETS: tuple[str, ...] = tuple(MODULE_PARENTS)

# Regex targets and layer-restricted targets are resolved by asking PEFT's matching rules about
# the module names of a model this deep; deeper than any Llama-family model in use (405B has 126).
_PROBE_LAYERS = 256
_EMBEDDING_PATHS = ("model.embed_tokens", "lm_head")

# Fields whose non-empty value changes the forward pass in a way stacked A/B slots cannot express.
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "modules_to_save": "it replaces whole base modules per adapter, which a shared base model cannot serve",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer replication changes the base model's depth",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "velora_config": "VeLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}
# Initialisations that rewrite the base weights; the adapter only works on that modified base
# unless it was converted at save time (which rewrites `init_lora_weights` to True).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def module_path(layer_idx: int, short_name: str) -> str:
    """The module's name inside the causal LM as PEFT sees it, e.g. `model.layers.1.self_attn.v_proj`."""
    return f"model.layers.{layer_idx}.{MODULE_PARENTS[short_name]}.{short_name}"


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is, independent of its weights. Treat the pattern dicts as read-only."""

    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: frozenset[str]  # short names among SUPPORTED_TARGETS
    base_model_name_or_path: str | None
    layers_to_transform: frozenset[int] | None = None  # None: every layer may carry weights
    use_dora: bool = False  # weight-decomposed: every module also carries a magnitude vector
    # What is left of the time its patterns may take matching (rank_pattern/alpha_pattern keys).
    patterns: PatternBudget = dataclasses.field(default_factory=PatternBudget, compare=False, repr=False)

    @property
    def max_rank(self) -> int:
        """The largest rank any module can have, known before the weights are read."""
        return max([self.rank, *self.rank_pattern.values()])

    def scale_for(self, module_path: str) -> tuple[int, float]:
        """(rank, scaling) of the module named `module_path` (see `module_path()`), as PEFT computes them."""
        rank_key = pattern_key(list(self.rank_pattern), module_path, "rank_pattern", self.patterns)
        alpha_key = pattern_key(list(self.alpha_pattern), module_path, "alpha_pattern", self.patterns)
        rank = self.rank_pattern.get(rank_key, self.rank)
        alpha = self.alpha_pattern.get(alpha_key, self.alpha)
        scaling = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return int(rank), float(scaling)


def read_adapter_spec(adapter_dir: Path, name: str | None = None, root: Path | str | None = None) -> AdapterSpec:
    """Read and validate `adapter_dir/adapter_config.json`; `name` (default: the folder's) labels errors.

    root: the adapter root the directory came from; the config must resolve inside it.
    """
    adapter_dir = Path(adapter_dir)
    name = name or adapter_dir.name
    raw = _read_json(adapter_dir, name, root)
    config = _to_lora_config(raw, name)
    _refuse_unsupported(config, name)
    budget = PatternBudget(name)
    targets = _resolve_targets(config, name, budget)
    rank_pattern = {
        k: _positive_int(v, f"rank_pattern[{k!r}]", name)
        for k, v in _patterns(config, "rank_pattern", name, budget)
    }
    alpha_pattern = {
        k: _finite(v, f"alpha_pattern[{k!r}]", name) for k, v in _patterns(config, "alpha_pattern", name, budget)
    }
    layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    if layers and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise AdapterConfigError(name, f"layers_to_transform must be layer indices, got {layers!r}")
    return AdapterSpec(
        rank=_positive_int(config.r, "r", name),
        alpha=_finite(config.lora_alpha, "lora_alpha", name),
        use_rslora=bool(config.use_rslora),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=targets,
        base_model_name_or_path=config.base_model_name_or_path,
        layers_to_transform=frozenset(layers) if layers else None,
        use_dora=bool(config.use_dora),
        patterns=budget,
    )


def _read_json(adapter_dir: Path, name: str, root: Path | str | None) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise AdapterNotFoundError(name, f"adapter directory {str(adapter_dir)!r} does not exist")
    path = confined(adapter_dir / CONFIG_NAME, root, name)
    if not path.is_file():
        raise AdapterNotFoundError(name, f"{CONFIG_NAME} is missing from {str(adapter_dir)!r}")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterConfigError(name, f"{CONFIG_NAME} is {size} bytes; at most {MAX_CONFIG_BYTES} are allowed")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also ints past 4300 digits
        raise AdapterConfigError(name, f"{CONFIG_NAME} is not valid JSON ({_why(exc)})") from None
    if not isinstance(raw, dict):
        raise AdapterConfigError(name, f"{CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(name, f"peft_type is {peft_type!r}; only 'LORA' adapters are supported")
    return raw


def _why(exc: Exception) -> str:
    # A position, never the text: the file may be something other than a config.
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, ValueError):
        return "a number too long to read"
    return "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__


def _to_lora_config(raw: dict[str, Any], name: str) -> Any:
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type", "runtime_config"}
    unknown = sorted(set(raw) - known - {"peft_type", "runtime_config"})
    if unknown:
        # Written by a newer peft; PEFT itself drops such keys with a warning, and any that
        # mattered for serving would show up as unexpected tensors when the weights load.
        logger.warning("adapter %r: ignoring unknown adapter_config.json keys %s", name, unknown)
    kwargs = {k: v for k, v in raw.items() if k in known}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = LoraConfig(**kwargs)
    except (TypeError, ValueError, ImportError) as exc:
        raise AdapterConfigError(name, f"{CONFIG_NAME} is not a valid LoRA config: {exc}") from exc
    for warning in caught:
        logger.warning("adapter %r: %s", name, warning.message)
    return config


def _refuse_unsupported(config: Any, name: str) -> None:
    if config.bias != "none":
        raise UnsupportedAdapterError(
            name,
            f"bias={config.bias!r} trains the base model's biases, which a shared base model cannot "
            "serve; expected bias='none'",
        )
    if getattr(config, "lora_bias", False):
        raise UnsupportedAdapterError(
            name, "lora_bias=true (a bias on lora_B) is not supported; expected false"
        )
    if config.fan_in_fan_out:
        raise UnsupportedAdapterError(
            name, "fan_in_fan_out=true (Conv1D-style [in, out] weights) is not supported; expected false"
        )
    for field, reason in _UNSUPPORTED_FIELDS.items():
        value = getattr(config, field, None)
        if value:
            raise UnsupportedAdapterError(name, f"{field}={value!r}: {reason}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            name,
            f"init_lora_weights={init!r} modifies the base weights; save the adapter with "
            "path_initial_model_for_weight_conversion to make it a plain LoRA",
        )


def _resolve_targets(config: Any, name: str, budget: PatternBudget) -> frozenset[str]:
    targets = config.target_modules
    if not targets:
        raise AdapterConfigError(
            name, f"target_modules is empty or missing ({targets!r}); expected a list of module names"
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = set(SUPPORTED_TARGETS)  # PEFT's shorthand for every linear layer but the output head
    whole = _selector(config, targets, name)
    # Layer restrictions cannot apply to un-numbered modules; ignore them to catch embeddings.
    unlayered = dataclasses.replace(whole, layers_to_transform=None, layers_pattern=None)
    for path in _EMBEDDING_PATHS:
        if unlayered.selects(path, budget):
            raise UnsupportedAdapterError(
                name,
                f"target_modules {_show(targets)} include {path!r}; LoRA on embeddings or lm_head "
                f"is not supported, expected only {list(SUPPORTED_TARGETS)}",
            )
    entries = [targets] if isinstance(targets, str) else sorted(targets)
    for entry in entries:
        one = targets if isinstance(targets, str) else frozenset({entry})
        probe = dataclasses.replace(whole, target_modules=one, exclude_modules=None)
        if not any(
            probe.selects(module_path(i, s), budget) for s in SUPPORTED_TARGETS for i in range(_PROBE_LAYERS)
        ):
            kind = "regex" if isinstance(targets, str) else "module"
            raise UnsupportedAdapterError(
                name,
                f"target_modules {kind} {_show(entry)} matches none of the supported modules "
                f"{list(SUPPORTED_TARGETS)} (module names look like {module_path(0, 'q_proj')!r})",
            )
    resolved = frozenset(
        short
        for short in SUPPORTED_TARGETS
        if any(whole.selects(module_path(i, short), budget) for i in range(_PROBE_LAYERS))
    )
    if not resolved:
        raise AdapterConfigError(name, f"target_modules {_show(targets)} leave no module to adapt")
    return resolved


def _selector(config: Any, targets: str | set[str], name: str) -> ModuleSelector:
    layers = config.layers_to_transform
    layers_pattern = config.layers_pattern
    if isinstance(layers_pattern, list):
        layers_pattern = tuple(layers_pattern)
    if layers_pattern is not None and not (
        isinstance(layers_pattern, str) or all(isinstance(p, str) for p in layers_pattern)
    ):
        raise AdapterConfigError(name, f"layers_pattern must be a string or a list of strings, got {_show(layers_pattern)}")
    return ModuleSelector(
        target_modules=targets if isinstance(targets, str) else _names(targets, "target_modules", name),
        exclude_modules=(
            None if not config.exclude_modules
            else config.exclude_modules if isinstance(config.exclude_modules, str)
            else _names(config.exclude_modules, "exclude_modules", name)
        ),
        layers_to_transform=layers if layers is None or isinstance(layers, int) else frozenset(layers),
        layers_pattern=layers_pattern,
    )


def _names(values: Any, field: str, name: str) -> frozenset[str]:
    if not all(isinstance(v, str) for v in values):
        raise AdapterConfigError(name, f"{field} must be a string or a list of strings, got {_show(values)}")
    return frozenset(values)


def _show(targets: Any) -> str:
    text = repr(targets) if isinstance(targets, str) or not isinstance(targets, (set, frozenset)) else repr(sorted(targets))
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def _patterns(config: Any, field: str, name: str, budget: PatternBudget) -> list[tuple[str, Any]]:
    patterns = getattr(config, field) or {}
    if not isinstance(patterns, dict):
        raise AdapterConfigError(name, f"{field} must be a JSON object, got {_show(patterns)}")
    for key in patterns:
        check_pattern_key(key, field, budget)  # PEFT matches the keys as regular expressions
    return list(patterns.items())


def _positive_int(value: Any, field: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterConfigError(name, f"{field} must be a positive integer, got {value!r}")
    return value


def _finite(value: Any, field: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterConfigError(name, f"{field} must be a finite number, got {value!r}")
    return float(value)
