"""PEFT's module matching, with every pattern from an adapter's config run under a time bound.

`target_modules` (a string), `exclude_modules` (a string), `layers_pattern` and the keys of
`rank_pattern`/`alpha_pattern` are regular expressions written by whoever made the adapter.
PEFT matches them with `re`, which holds the GIL and cannot be interrupted: one pattern that
backtracks catastrophically would freeze the whole server. Here they run on the `regex` engine
with a timeout: a match that takes more than a few milliseconds runs again with the GIL
released (`concurrent=True`, so other threads, the event loop's included, keep running), and is
refused past `PER_MATCH_SECONDS`; all matches of one adapter share a budget of `MATCH_SECONDS`
(a config may list a pattern per module: hundreds of patterns times hundreds of names).
Patterns are size-checked before they are compiled, because `regex` expands counted repeats at
compile time (`a{4294967294}` would take gigabytes).

The semantics are PEFT's `check_target_module_exists` and `get_pattern_key`; the tests hold
these functions to PEFT's on ordinary patterns.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import regex

from adapters.errors import AdapterConfigError

MATCH_SECONDS = 10.0  # all matching of one adapter's patterns; PEFT itself takes seconds on the largest
PER_MATCH_SECONDS = 0.25  # one pattern against one module name takes microseconds
_GIL_HELD_SECONDS = 0.005  # a match that takes longer runs again with the GIL released
MAX_PATTERN_CHARS = 1000  # module names are ~40 characters; no useful pattern is longer
_MAX_EXPANSION = 100_000  # pattern length x the product of its counted repeats
_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's, applied to our own names
_SHOWN_CHARS = 80


class PatternBudget:
    """The time adapter `adapter`'s patterns may spend matching module names, in all, and the
    patterns compiled so far. Not thread-safe: one adapter is read by one thread."""

    def __init__(self, adapter: str = "adapter", seconds: float | None = None) -> None:
        self.adapter = adapter
        self.seconds = MATCH_SECONDS if seconds is None else seconds
        self._left = self.seconds
        self._compiled: dict[str, regex.Pattern[str]] = {}

    def compile(self, pattern: object, field: str, shown: object | None = None) -> regex.Pattern[str]:
        """`pattern` compiled, or AdapterConfigError naming `field` and `shown` (default: the pattern)."""
        shown = pattern if shown is None else shown
        if not isinstance(pattern, str):
            raise AdapterConfigError(self.adapter, f"{field} {_show(shown)} must be a string")
        compiled = self._compiled.get(pattern)
        if compiled is not None:
            return compiled
        if len(pattern) > MAX_PATTERN_CHARS + 32:  # room for the wrapper PEFT puts around a key
            raise AdapterConfigError(
                self.adapter,
                f"{field} {_show(shown)} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed",
            )
        if len(pattern) * _repeat_product(pattern) > _MAX_EXPANSION:
            raise AdapterConfigError(
                self.adapter, f"{field} {_show(shown)} repeats too much ({{m,n}} counts too large for module names)"
            )
        try:
            compiled = regex.compile(pattern)
        except (regex.error, OverflowError, MemoryError, RecursionError) as exc:
            raise AdapterConfigError(
                self.adapter, f"{field} {_show(shown)} is not a valid regular expression: {exc}"
            ) from None
        self._compiled[pattern] = compiled
        return compiled

    def fullmatch(self, pattern: str, text: str, field: str) -> regex.Match[str] | None:
        return self._run(self.compile(pattern, field), text, field, pattern, full=True)

    def match(self, pattern: str, text: str, field: str, shown: str) -> regex.Match[str] | None:
        return self._run(self.compile(pattern, field, shown), text, field, shown, full=False)

    def _run(
        self, compiled: regex.Pattern[str], text: str, field: str, shown: str, full: bool
    ) -> regex.Match[str] | None:
        run = compiled.fullmatch if full else compiled.match
        started = time.perf_counter()
        try:
            if self._left <= 0:
                raise TimeoutError
            try:
                return run(text, timeout=min(_GIL_HELD_SECONDS, self._left))
            except TimeoutError:
                return run(text, timeout=min(PER_MATCH_SECONDS, self._left), concurrent=True)
        except TimeoutError:
            spent = self._left <= time.perf_counter() - started
            self._left = 0.0
            why = (
                f"all of its patterns may take {self.seconds:g} s" if spent
                else f"one module name may take {PER_MATCH_SECONDS:g} s"
            )
            raise AdapterConfigError(
                self.adapter,
                f"{field} {_show(shown)} could not be matched against the module names in time ({why}; a "
                "regular expression that backtracks catastrophically?); simplify it",
            ) from None
        finally:
            self._left -= time.perf_counter() - started


@dataclass(frozen=True)
class ModuleSelector:
    """The fields of a LoraConfig that decide whether a module is adapted (PEFT's
    `check_target_module_exists`, less modules_to_save and target_parameters, which are refused)."""

    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None = None
    layers_to_transform: int | frozenset[int] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def selects(self, key: str, budget: PatternBudget) -> bool:
        """Whether PEFT would put LoRA on the module named `key` (e.g. `model.layers.0.self_attn.q_proj`)."""
        excluded = self.exclude_modules
        if excluded:
            if isinstance(excluded, str):
                if budget.fullmatch(excluded, key, "exclude_modules"):
                    return False
            elif key in excluded or any(key.endswith(f".{e}") for e in excluded):
                return False
        targets = self.target_modules
        if isinstance(targets, str):
            return budget.fullmatch(targets, key, "target_modules") is not None
        if key in targets:
            return True
        found = any(key.endswith(f".{t}") for t in targets)
        layers = self.layers_to_transform
        uses_layers = layers is not None and (isinstance(layers, int) or len(layers) != 0)
        if not (found and uses_layers):
            return found
        index = self._layer_index(key, budget)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers  # type: ignore[operator]

    def _layer_index(self, key: str, budget: PatternBudget) -> int | None:
        patterns = self.layers_pattern
        if not patterns:
            found = _DEFAULT_LAYER_INDEX.match(key)
        else:
            found = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                # The first index, not the last (an MoE expert index comes later).
                found = budget.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, "layers_pattern", pattern)
                if found is not None:
                    break
        index = found.groupdict().get("idx") if found is not None else None
        return None if index is None else int(index)


def pattern_key(keys: list[str], key: str, field: str, budget: PatternBudget) -> str:
    """PEFT's `get_pattern_key`: the first of `keys` naming the module `key` (or a suffix of it
    on a dot), else `key` itself."""
    for pattern in keys:
        if budget.match(_pattern_key_regex(pattern), key, field, pattern) is not None:
            return pattern
    return key


def check_pattern_key(pattern: object, field: str, budget: PatternBudget) -> None:
    """AdapterConfigError unless `pattern` can be a key of rank_pattern/alpha_pattern."""
    budget.compile(pattern if not isinstance(pattern, str) else _pattern_key_regex(pattern), f"{field} key", pattern)


def _pattern_key_regex(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


def _repeat_product(pattern: str) -> int:
    # An upper bound on how many times `regex` may copy a piece of the pattern when it compiles
    # counted repeats, nested or not; `{` that is not a quantifier only makes it stricter.
    product = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        if len(low) > 6 or len(high) > 6:
            return _MAX_EXPANSION + 1
        product *= max(int(low or 0), int(high or 0), 1)
        if product > _MAX_EXPANSION:
            break
    return product


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"

