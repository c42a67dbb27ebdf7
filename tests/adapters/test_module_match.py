"""PEFT's module matching under a time bound: the same answers as PEFT's helpers on ordinary
patterns, and hostile patterns refused in bounded time without stopping other threads."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from adapters import module_match
from adapters.errors import AdapterConfigError
from adapters.module_match import ModuleSelector, PatternBudget, pattern_key
from adapters.peft_format import SUPPORTED_TARGETS, module_path, read_adapter_spec
from tests.adapters.test_peft_format import write_config

NAMES = [module_path(i, s) for i in (0, 1, 7, 10, 31) for s in SUPPORTED_TARGETS] + [
    "model.embed_tokens", "lm_head", "model.layers.2.mlp.experts.3.up_proj", "model.norm",
]
# Backtracks exponentially on a module name in `re` and in `regex` alike.
CATASTROPHIC = r"(?:.|\w|[a-z]|\S)*\.q"


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": r".*\.(q_proj|v_proj)"},
        {"target_modules": r"model\.layers\.1\.mlp\..*", "exclude_modules": r".*up_proj"},
        {"target_modules": {"q_proj", "mlp.down_proj", "model.layers.0.self_attn.o_proj"}},
        {"target_modules": {"q_proj", "up_proj"}, "exclude_modules": {"layers.7.self_attn.q_proj"}},
        {"target_modules": {"q_proj", "up_proj"}, "layers_to_transform": [1, 10]},
        {"target_modules": {"up_proj"}, "layers_to_transform": 2},
        {"target_modules": {"v_proj", "up_proj"}, "layers_to_transform": [0, 2], "layers_pattern": "layers"},
        {"target_modules": {"v_proj"}, "layers_to_transform": [7], "layers_pattern": ["blocks", "lay.rs"]},
        {"target_modules": {"v_proj"}, "layers_to_transform": [], "layers_pattern": "h"},
    ],
)
def test_module_selection_agrees_with_peft(config: dict[str, Any]) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_view = SimpleNamespace(
        target_modules=config["target_modules"], exclude_modules=config.get("exclude_modules"),
        modules_to_save=None, target_parameters=None,
        layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"),
    )
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    ours = ModuleSelector(
        target_modules=config["target_modules"] if isinstance(config["target_modules"], str)
        else frozenset(config["target_modules"]),
        exclude_modules=config.get("exclude_modules") if isinstance(config.get("exclude_modules"), str | None)
        else frozenset(config["exclude_modules"]),
        layers_to_transform=layers if layers is None or isinstance(layers, int) else frozenset(layers),
        layers_pattern=tuple(pattern) if isinstance(pattern, list) else pattern,
    )
    budget = PatternBudget("a")
    for name in NAMES:
        assert ours.selects(name, budget) == bool(check_target_module_exists(peft_view, name)), name


def test_pattern_keys_agree_with_peft() -> None:
    from peft.utils.other import get_pattern_key

    keys = ["layers.1.self_attn.v_proj", "o_proj", r"model\.layers\.(7|10)\.mlp\..*", "q", "mlp.up_proj"]
    budget = PatternBudget("a")
    for name in NAMES:
        assert pattern_key(keys, name, "rank_pattern", budget) == get_pattern_key(keys, name), name


@pytest.mark.parametrize(
    "overrides",
    [
        {"target_modules": CATASTROPHIC},
        {"target_modules": ["q_proj"], "exclude_modules": CATASTROPHIC},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": r"(?:.|\w|[a-z]|\S)*(?:j|_)"},
    ],
    ids=["target_modules", "exclude_modules", "layers_pattern"],
)
def test_catastrophic_patterns_are_refused_within_the_budget(tmp_path, overrides) -> None:
    adapter = write_config(tmp_path / "hostile", **overrides)
    started = time.monotonic()
    with pytest.raises(AdapterConfigError, match=r"could not be matched .* in time \(one module name may take 0.25 s"):
        read_adapter_spec(adapter)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_rank_and_alpha_keys_are_refused_within_the_budget(tmp_path, field) -> None:
    spec = read_adapter_spec(write_config(tmp_path / "hostile", **{field: {CATASTROPHIC: 4}}))
    started = time.monotonic()
    with pytest.raises(AdapterConfigError, match=f"{field} .* could not be matched"):
        spec.scale_for(module_path(0, "q_proj"))
    assert time.monotonic() - started < 3.0
    with pytest.raises(AdapterConfigError, match="could not be matched"):  # the budget stays spent
        spec.scale_for(module_path(1, "q_proj"))


def test_a_hostile_pattern_does_not_stop_other_threads(tmp_path, monkeypatch) -> None:
    # `re` holds the GIL for the whole match: this thread would not run until it gave up.
    monkeypatch.setattr(module_match, "PER_MATCH_SECONDS", 1.0)
    adapter = write_config(tmp_path / "hostile", target_modules=CATASTROPHIC)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            read_adapter_spec(adapter)
        except AdapterConfigError as exc:
            errors.append(exc)

    worker = threading.Thread(target=read)
    worker.start()
    longest, last = 0.0, time.monotonic()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    worker.join()
    assert errors and "could not be matched" in str(errors[0])
    assert longest < 0.5, f"this thread stood still for {longest:.2f} s"


def test_a_pattern_per_module_fits_the_budget(tmp_path) -> None:
    # 80 layers x 7 modules, each named in rank_pattern and alpha_pattern: ~630k matches in all.
    keys = {module_path(i, s): 4 for i in range(80) for s in SUPPORTED_TARGETS}
    spec = read_adapter_spec(write_config(tmp_path / "a", r=8, rank_pattern=keys, alpha_pattern=dict(keys)))
    assert all(spec.scale_for(path) == (4, 1.0) for path in keys)
    assert spec.scale_for(module_path(80, "q_proj")) == (8, 16 / 8)


def test_the_budget_bounds_all_matching_of_an_adapter(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(module_match, "MATCH_SECONDS", 0.001)
    with pytest.raises(AdapterConfigError, match="all of its patterns may take 0.001 s"):
        read_adapter_spec(write_config(tmp_path / "a", target_modules=r".*\.(q|v)_proj"))


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("a{4294967294}", "repeats too much"),
        ("(?:x{65535}){65535}", "repeats too much"),
        ("(a{1000}){1000}", "repeats too much"),
        ("x" * 2000, "2000 characters long"),
        ("q_proj(", "not a valid regular expression"),
    ],
)
def test_patterns_too_big_to_compile_are_refused_before_compiling(tmp_path, pattern, message) -> None:
    started = time.monotonic()
    with pytest.raises(AdapterConfigError, match=message) as info:
        read_adapter_spec(write_config(tmp_path / "big", target_modules=pattern))
    assert time.monotonic() - started < 2.0
    assert len(str(info.value)) < 400, "the message shows a bounded excerpt of the pattern"
