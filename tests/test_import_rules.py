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


# server/ by layer. The shared modules hold what every surface uses; the composition modules
# (app, cli, lifespan, wiring, openapi) put the surfaces together and are imported by none of them.
SERVER_SHARED = {"server.state", "server.store", "server.limits", "server.version"}
SERVER_LAYERS = {  # a part of server -> the parts of server it may import
    "server.http": {"server.http"},
    "server.openai": {"server.http", "server.openai"},
    "server.admin": {"server.http", "server.admin"},
    "server.finetune": {"server.http", "server.openai", "server.finetune"},
    "server.seekrflow": {"server.http", "server.openai", "server.finetune", "server.seekrflow"},
}


def _server_part(module: str) -> str:
    """`server.openai.chat` -> `server.openai`; a top-level module is its own part."""
    parts = module.split(".")
    if len(parts) >= 2 and f"server.{parts[1]}" in SERVER_LAYERS:
        return f"server.{parts[1]}"
    return ".".join(parts[:2])


def _imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from module import name` with an absolute module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 for alias in node.names]


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_server_parts_import_only_the_layers_below_them() -> None:
    for path in _files("server"):
        own = _server_part(_module_of(path))
        if own not in SERVER_LAYERS and own not in SERVER_SHARED:
            continue  # the composition modules may import anything
        allowed = SERVER_LAYERS.get(own, {"server.http"}) | SERVER_SHARED
        for name in _imports(path):
            if name.split(".")[0] != "server" or name == "server":
                continue
            assert _server_part(name) in allowed, f"{path.relative_to(ROOT)} imports {name}"


def test_server_parts_use_each_other_only_through_public_names() -> None:
    for path in _files("server"):
        own = _server_part(_module_of(path))
        for module, name in _imported_names(path):
            if module.split(".")[0] == "server" and _server_part(module) != own:
                assert not name.startswith("_"), f"{path.relative_to(ROOT)} imports {module}.{name}"
