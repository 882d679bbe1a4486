"""docker-compose.yml points at real entry points and every variable it needs is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def documented_variables() -> set[str]:
    names = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    return names


def module_defines(target: str) -> bool:
    """``package.module:attribute`` names a file that defines or assigns that attribute at top level."""
    module, attribute = target.split(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == attribute:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attribute:
            return True
    return False


def test_stack_has_every_service() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "api", "worker", "inference", "flower"}


@pytest.mark.parametrize("name", ["migrate", "api", "worker", "inference", "flower"])
def test_command_points_at_a_real_entry_point(name: str) -> None:
    command = SERVICES[name]["command"]
    if command[0] == "uvicorn":
        assert "--factory" in command and module_defines(command[1])
    elif command[0] == "celery":
        assert module_defines(command[command.index("-A") + 1])
    elif command[0] == "alembic":
        assert command[1:] == ["upgrade", "head"] and (ROOT / "alembic.ini").is_file()
    else:
        pytest.fail(f"unexpected command {command}")


@pytest.mark.parametrize("name", ["migrate", "worker", "inference"])
def test_dockerfiles_exist_and_install_only_their_extra(name: str) -> None:
    build = SERVICES[name]["build"]
    dockerfile = (ROOT / build["dockerfile"]).read_text()
    extra = {"migrate": "api", "worker": "worker", "inference": "inference"}[name]
    # An image may take its extras as a build argument (the inference image can add llamacpp); its default counts.
    default = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, flags=re.MULTILINE)
    installed = re.findall(r'pip install "\.\[([^\]]+)\]"', dockerfile)
    assert [default.group(1) if e == "$EXTRAS" and default else e for e in installed] == [extra]
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE):
        assert (ROOT / path).exists(), path


def test_every_interpolated_variable_is_documented() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert used and used <= documented_variables()


def test_service_environment_names_real_settings() -> None:
    settings_fields = {name.upper() for name in Settings.model_fields}
    env = SERVICES["api"]["environment"]
    assert set(env) <= settings_fields
    assert {v for v in documented_variables() if v in settings_fields} == settings_fields


def test_dependencies_wait_for_health_and_migration() -> None:
    for name in ("api", "worker", "inference"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "inference"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "--basic-auth" in " ".join(SERVICES["flower"]["command"])
