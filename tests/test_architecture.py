"""The one import rule: services import only core and themselves; core and api never import model libraries.

``artifacts`` (model files both the worker and inference need: GGUF export, reference answers) sits beside
``core``: it imports only ``core``, and only ``worker`` and ``inference`` import it. The web stack the two services
share (``core/http``) is the only part of ``core`` that imports a web framework, and the worker never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("core", "artifacts", "api", "worker", "inference", "cli")
HEAVY = {"torch", "transformers", "peft", "accelerate", "gguf", "safetensors"}
FORBIDDEN = {
    "core": {"artifacts", "api", "worker", "inference", "cli"} | HEAVY,
    "artifacts": {"api", "worker", "inference", "cli"},
    "api": {"artifacts", "worker", "inference", "cli"} | HEAVY,
    "worker": {"api", "inference", "cli"},
    "inference": {"api", "worker", "cli"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import in a file, at any depth (function-level imports count too)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rule(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    violations = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
        for f in files
        if imported_roots(f) & FORBIDDEN[package]
    }
    assert violations == {}


WEB = {"fastapi", "starlette", "prometheus_client"}


def imported_modules(path: Path) -> set[str]:
    """Full dotted name of every module a file imports (``from core.http import errors`` counts as
    ``core.http``)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_the_web_stack_stays_in_core_http_and_out_of_the_worker() -> None:
    def uses_web(path: Path) -> bool:
        return bool({m.split(".")[0] for m in imported_modules(path)} & WEB) or any(
            m == "core.http" or m.startswith("core.http.") for m in imported_modules(path)
        )

    core_outside_http = [p for p in (ROOT / "core").rglob("*.py") if (ROOT / "core" / "http") not in p.parents]
    offenders = [p for p in [*core_outside_http, *(ROOT / "worker").rglob("*.py")] if uses_web(p)]
    assert [str(p.relative_to(ROOT)) for p in offenders] == []


def test_rule_checker_sees_function_level_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import torch.nn\n    from worker.tasks import x\n")
    assert imported_roots(sample) == {"torch", "worker"}


def test_api_enqueues_by_name_only() -> None:
    """The api rings the broker with a task name; it never imports the task function."""
    source = "\n".join(p.read_text() for p in (ROOT / "api").rglob("*.py"))
    assert "worker.tasks" not in source
