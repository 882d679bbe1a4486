"""docker-compose.yml: real entry points, every variable documented, and the model compose would run is sound.

The model is rendered as ``docker compose config`` renders it (YAML anchors and merges resolved, then
``${...}`` interpolated from an env file) and checked against the Compose Specification's JSON schema and for
what the deployment promises: auth on, no example secret, no secret on a command line, Flower on loopback only,
restart policies, health checks and unprivileged images. Where the ``docker compose`` tool works it renders the
file too and must agree.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.exposure import StartupRefused, check_startup
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]
# One training worker per GPU, each reserving its own device.
WORKERS = ("worker-gpu0", "worker-gpu1")
INFERENCES = ("inference", "inference-vllm-gpu0")  # the second: INFERENCE_BACKEND=vllm, profile vllm
CONCH_SERVICES = ("migrate", "api", *WORKERS, *INFERENCES, "flower")
LONG_RUNNING = ("postgres", "redis", "api", *WORKERS, *INFERENCES, "flower")
# What an operator writes into .env next to the example's values.
OPERATOR_SECRETS = {"POSTGRES_PASSWORD": "5f0c2a9e7b1d44e6a3c8", "FLOWER_BASIC_AUTH": "ops:91d7e2c4b6a8f0e3"}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads an env file: comments and blank lines skipped, quotes removed, and an
    unquoted value ends at `` #``."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        values[name.strip()] = value
    return values


class MissingVariable(Exception):
    pass


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _braced_end(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` whose body starts at ``start`` (defaults may hold braces)."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``$$`` is a literal ``$``; ``${X}``, ``$X``; ``${X:-d}``/``${X-d}`` (default when
    unset or empty / unset); ``${X:?e}``/``${X?e}`` (an error); ``${X:+a}``/``${X+a}`` (a replacement)."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$":
            out.append(char)
            index += 1
            continue
        following = text[index + 1 : index + 2]
        if following == "$":
            out.append("$")
            index += 2
        elif following == "{":
            end = _braced_end(text, index + 2)
            body = text[index + 2 : end]
            match = NAME.match(body)
            assert match, f"bad variable in {text!r}"
            name, rest = match.group(), body[match.end() :]
            value = env.get(name)
            empty = not value
            if rest == "":
                out.append(value or "")
            elif rest[:2] in (":-", ":?", ":+") or rest[:1] in ("-", "?", "+"):
                strict = rest.startswith(":")
                operator, argument = (rest[1], rest[2:]) if strict else (rest[0], rest[1:])
                missing = empty if strict else value is None
                if operator == "-":
                    out.append(interpolate(argument, env) if missing else value or "")
                elif operator == "?":
                    if missing:
                        raise MissingVariable(f"{name}: {argument}")
                    out.append(value or "")
                else:
                    out.append("" if missing else interpolate(argument, env))
            else:
                raise AssertionError(f"unsupported interpolation {body!r}")
            index = end + 1
        else:
            match = NAME.match(text, index + 1)
            assert match, f"a lone $ in {text!r} (write $$ for a literal)"
            out.append(env.get(match.group(), ""))
            index = match.end()
    return "".join(out)


def render(env: dict[str, str]) -> dict[str, Any]:
    """The compose model after interpolation (values only, as compose does; YAML merges already applied)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        if isinstance(node, str):
            return interpolate(node, env)
        return node

    return dict(walk(yaml.safe_load(COMPOSE_FILE.read_text())))


def operator_env(**overrides: str) -> dict[str, str]:
    return {**read_env_file(ROOT / ".env.example"), **OPERATOR_SECRETS, **overrides}


RENDERED = render(operator_env())
RENDERED_SERVICES: dict[str, dict[str, Any]] = RENDERED["services"]


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


WRAPPER = ["python", "-m", "core.exposure", "--"]


def service_command(name: str) -> list[str]:
    """The command a service runs, after the start-up guard that runs it in its place."""
    command = list(SERVICES[name]["command"])
    return command[len(WRAPPER) :] if command[: len(WRAPPER)] == WRAPPER else command


def settings_from(environment: dict[str, str]) -> Settings:
    """The settings a container reads from its environment (and nothing from this machine's)."""
    fields = set(Settings.model_fields)
    values = {key.lower(): value for key, value in environment.items() if key.lower() in fields}
    return Settings(_env_file=None, **values)


def test_stack_has_every_service() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "api", *WORKERS, *INFERENCES, "flower"}


@pytest.mark.parametrize("name", CONCH_SERVICES)
def test_command_points_at_a_real_entry_point(name: str) -> None:
    command = service_command(name)
    if command[0] == "uvicorn":
        assert "--factory" in command and module_defines(command[1])
    elif command[0] == "celery":
        assert module_defines(command[command.index("-A") + 1])
    elif command[0] == "alembic":
        assert command[1:] == ["upgrade", "head"] and (ROOT / "alembic.ini").is_file()
    else:
        pytest.fail(f"unexpected command {command}")
    if SERVICES[name]["command"][: len(WRAPPER)] == WRAPPER:
        assert module_defines("core.exposure:main")


@pytest.mark.parametrize("name", ["migrate", *WORKERS, *INFERENCES])
def test_dockerfiles_exist_and_install_only_their_extra(name: str) -> None:
    build = SERVICES[name]["build"]
    dockerfile = (ROOT / build["dockerfile"]).read_text()
    extra = {"migrate": "api", **dict.fromkeys(INFERENCES, "inference")}.get(name, "worker")
    # An image may take its extras as a build argument (the inference image can add llamacpp); its default counts.
    default = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, flags=re.MULTILINE)
    installed = re.findall(r'pip install "\.\[([^\]]+)\]"', dockerfile)
    (extras,) = [default.group(1) if e == "$EXTRAS" and default else e for e in installed]
    # Its own extra, plus only the add-ons of that service (never another service's libraries).
    assert extra in extras.split(",") and set(extras.split(",")) <= {extra} | SERVICE_ADD_ONS[extra], extras
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE):
        assert (ROOT / path).exists(), path


PROJECT_PACKAGES = ("core", "artifacts", "api", "worker", "inference", "cli")
SERVICE_ADD_ONS = {"api": set(), "worker": {"qlora"}, "inference": {"llamacpp"}}


def _project_imports(package: str) -> set[str]:
    """The project's top-level packages that ``package``'s modules import."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in PROJECT_PACKAGES}
    return found


@pytest.mark.parametrize("service", ["api", "worker", "inference"])
def test_each_image_copies_every_package_its_service_imports(service: str) -> None:
    needed, todo = {service}, [service]
    while todo:
        for package in _project_imports(todo.pop()) - needed:
            needed.add(package)
            todo.append(package)
    dockerfile = (ROOT / "docker" / f"{service}.Dockerfile").read_text()
    copied = {line.split()[0] for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE)}
    assert needed <= copied, f"{service} image lacks {sorted(needed - copied)}"


def test_every_interpolated_variable_is_documented() -> None:
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert used and used <= documented_variables()


def test_service_environment_names_real_settings() -> None:
    settings_fields = {name.upper() for name in Settings.model_fields}
    env = SERVICES["api"]["environment"]
    assert set(env) <= settings_fields
    assert {v for v in documented_variables() if v in settings_fields} == settings_fields


def test_dependencies_wait_for_health_and_migration() -> None:
    for name in ("api", *WORKERS, *INFERENCES):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in (*WORKERS, *INFERENCES):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


# --- the rendered model


def test_the_example_env_ships_no_secret_and_compose_refuses_to_start_without_one() -> None:
    example = read_env_file(ROOT / ".env.example")
    for name in OPERATOR_SECRETS:
        assert example[name] == "", f"{name} has a value in .env.example"
        with pytest.raises(MissingVariable, match=name):
            render({**example, **{k: v for k, v in OPERATOR_SECRETS.items() if k != name}})


def test_every_variable_is_resolved() -> None:
    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for value in node.values() for s in strings(value)]
        if isinstance(node, list):
            return [s for value in node for s in strings(value)]
        return [node] if isinstance(node, str) else []

    leftovers = [s for s in strings(RENDERED) if "${" in s]
    assert leftovers == []
    # $$ reaches the container as one $, for its own shell.
    assert "celery@$HOSTNAME" in " ".join(RENDERED_SERVICES["worker-gpu0"]["healthcheck"]["test"])


def _check_jsonschema(model: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    instance = tmp_path / "compose.json"
    instance.write_text(json.dumps(model))
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(instance)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_rendered_model_follows_the_compose_specification(tmp_path: Path) -> None:
    result = _check_jsonschema(RENDERED, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema has teeth: a field of the wrong shape fails.
    broken = json.loads(json.dumps(RENDERED))
    broken["services"]["api"]["healthcheck"]["retries"] = {"twelve": 12}
    result = _check_jsonschema(broken, tmp_path)
    assert result.returncode != 0 and "retries" in result.stdout + result.stderr


def _published(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """(host address or None, host port, container port) of each short-syntax port."""
    published = []
    for port in service.get("ports", []):
        parts = str(port).rsplit(":", 2)
        address = parts[0] if len(parts) == 3 else None
        published.append((address, parts[-2], parts[-1]))
    return published


def test_only_the_authenticated_services_are_published_beyond_loopback() -> None:
    for name, service in RENDERED_SERVICES.items():
        for address, host_port, container_port in _published(service):
            assert host_port.isdigit() and container_port.isdigit(), (name, service["ports"])
            if name in ("api", *INFERENCES):
                command = service["command"]
                assert container_port == command[command.index("--port") + 1]
            else:
                assert name == "flower" and address == "127.0.0.1", (name, service["ports"])
    assert not RENDERED_SERVICES["postgres"].get("ports") and not RENDERED_SERVICES["redis"].get("ports")


@pytest.mark.parametrize("name", ["api", *INFERENCES])
def test_the_start_up_guard_accepts_the_stack_and_refuses_it_without_auth(name: str) -> None:
    service = RENDERED_SERVICES[name]
    host = service["command"][service["command"].index("--host") + 1]
    environment = service["environment"]
    assert environment["AUTH_REQUIRED"] == "true"
    check_startup(settings_from(environment), service=name, host=host, environ=environment)

    unauthenticated = render(operator_env(AUTH_REQUIRED="false"))["services"][name]["environment"]
    with pytest.raises(StartupRefused, match="AUTH_REQUIRED=false"):
        check_startup(settings_from(unauthenticated), service=name, host=host, environ=unauthenticated)

    example_secret = render(operator_env(POSTGRES_PASSWORD="change-me"))["services"][name]["environment"]
    with pytest.raises(StartupRefused, match="DATABASE_URL"):
        check_startup(settings_from(example_secret), service=name, host=host, environ=example_secret)


def test_no_secret_on_a_command_line() -> None:
    secrets = set(OPERATOR_SECRETS.values()) | {OPERATOR_SECRETS["FLOWER_BASIC_AUTH"].split(":")[1]}
    for name, service in RENDERED_SERVICES.items():
        command = service.get("command", [])
        assert not any(secret in part for secret in secrets for part in command), name
    flower = RENDERED_SERVICES["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == OPERATOR_SECRETS["FLOWER_BASIC_AUTH"]
    assert not any("basic-auth" in part or "basic_auth" in part for part in flower["command"])


def test_restart_policies() -> None:
    for name, service in RENDERED_SERVICES.items():
        expected = {"no"} if name == "migrate" else {"unless-stopped", "always"}
        assert service.get("restart") in expected, name


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    test = RENDERED_SERVICES[name]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1


@pytest.mark.parametrize("name", WORKERS)
def test_the_worker_healthcheck_pings_its_own_node(name: str) -> None:
    command = service_command(name)
    # Without -n the node is celery@<hostname>, which is what the check pings.
    assert "-n" not in command and "--hostname" not in command
    check = " ".join(RENDERED_SERVICES[name]["healthcheck"]["test"][1:])
    assert "worker.app:celery_app inspect ping" in check and "-d celery@$HOSTNAME" in check


def _reserved_gpus(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [str(i) for d in devices if "gpu" in d.get("capabilities", []) for i in d.get("device_ids", [])]


def test_each_worker_reserves_its_own_gpu_and_names_its_device_class() -> None:
    """``count: 1`` (or replicas of one service) would give every worker GPU 0: each names its own device id."""
    workers = {name: s for name, s in RENDERED_SERVICES.items() if name.startswith("worker")}
    assert set(workers) == set(WORKERS)
    reserved = []
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert all("count" not in d for d in devices) and "replicas" not in service["deploy"], name
        assert len(_reserved_gpus(service)) == 1, name
        reserved += _reserved_gpus(service)
        device_class = service["environment"]["WORKER_DEVICE_CLASS"]
        assert settings_from(service["environment"]).worker_device_class == device_class == "gpu-any", name
        assert service["command"][service["command"].index("-Q") + 1] == "training"  # plus training.<class>
    assert sorted(reserved) == [str(i) for i in range(len(WORKERS))]  # no GPU reserved twice
    # The first GPU's worker runs by default; the others join with their profile on a host that has the GPU.
    assert "profiles" not in workers["worker-gpu0"] and workers["worker-gpu1"]["profiles"] == ["gpu1"]
    # An operator's class name reaches every worker.
    rendered = render(operator_env(GPU_DEVICE_CLASS="gpu-a100"))["services"]
    assert {rendered[name]["environment"]["WORKER_DEVICE_CLASS"] for name in WORKERS} == {"gpu-a100"}


def _final_user(dockerfile: str) -> str | None:
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    return users[-1] if users else None


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_images_run_unprivileged(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    user = _final_user(text)
    assert user is not None and user.split(":")[0] not in ("root", "0"), user
    # ...after every step that installs or changes files as root.
    assert text.rindex("\nUSER ") > max(text.rindex("\nRUN "), text.rindex("\nCOPY "))
    if "EXPOSE" in text:  # the HTTP images listen on every interface: auth on unless the deployment says not
        assert re.search(r"^ENV AUTH_REQUIRED=true$", text, flags=re.MULTILINE)


def test_no_service_switches_back_to_root() -> None:
    for name in CONCH_SERVICES:
        assert RENDERED_SERVICES[name].get("user") in (None, "10001", "10001:10001"), name


def test_the_build_context_leaves_out_secrets_but_not_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".env" in patterns
    copied = {
        path
        for dockerfile in (ROOT / "docker").glob("*.Dockerfile")
        for line in re.findall(r"^COPY (.+)$", dockerfile.read_text(), flags=re.MULTILINE)
        for path in line.split()[:-1]
    }
    excluded = {path for path in copied for pattern in patterns if fnmatch.fnmatch(path, pattern.lstrip("*/"))}
    assert copied and excluded == set()


def _docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            return command
    return None


def test_docker_compose_renders_the_same_model(tmp_path: Path) -> None:
    """Where the compose tool (v2) is installed, its own rendering agrees on what matters."""
    compose = _docker_compose()
    if compose is None:
        pytest.skip("docker compose v2 is not installed here; the schema and structural checks above stand in")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in operator_env().items()))
    result = subprocess.run(
        [*compose, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["services"]
    assert set(model) == set(RENDERED_SERVICES)
    for name, service in model.items():
        assert service.get("restart") == RENDERED_SERVICES[name]["restart"], name
        assert service.get("command") == RENDERED_SERVICES[name]["command"], name
        published = {(p.get("host_ip") or None, str(p["published"])) for p in service.get("ports", [])}
        assert published == {(address, host_port) for address, host_port, _ in _published(RENDERED_SERVICES[name])}
    assert model["api"]["environment"]["AUTH_REQUIRED"] == "true"
    assert model["flower"]["environment"]["FLOWER_BASIC_AUTH"] == OPERATOR_SECRETS["FLOWER_BASIC_AUTH"]
