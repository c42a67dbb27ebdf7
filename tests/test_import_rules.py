"""The import rules of the design, checked on the source (no imports executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INTERNAL = {"server", "engine", "scheduler", "adapters", "training"}

# package -> internal packages it may import
ALLOWED = {
    "server": {"server", "engine", "adapters", "training", "scheduler"},
    "engine": {"engine", "scheduler", "adapters"},
    "scheduler": {"scheduler"},
    "adapters": {"adapters"},
    "training": {"training", "adapters"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_internal_imports_follow_the_design(package: str) -> None:
    for path in _files(package):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in INTERNAL:
                assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"


def test_scheduler_never_imports_torch() -> None:
    for path in _files("scheduler"):
        tops = {name.split(".")[0] for name in _imports(path)}
        assert "torch" not in tops, f"{path.relative_to(ROOT)} imports torch"


def test_models_do_not_import_lora_or_adapters() -> None:
    for path in _files("engine/models"):
        for name in _imports(path):
            assert not name.startswith(("adapters", "engine.lora")), f"{path.relative_to(ROOT)} imports {name}"
