"""docker-compose.yml and Dockerfile: valid, complete, and consistent with the project.

Docker cannot run containers here, so the file is checked three ways: ``docker-compose
config`` parses and interpolates it (no engine needed), and PyYAML reads it so that every
service's command can be resolved in the project and every environment variable it sets can
be matched against what the settings read.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config.test_settings import documented_variables, settings_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
RAMPART_SERVICES = ("migrate", "web", "edge", "worker", "beat")
# Read by a library rather than by config/settings: Django itself, and prometheus_client's
# multiprocess mode (routing.edge.health).
LIBRARY_VARIABLES = {"DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR"}


def compose_config(extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose is not installed (Debian package docker-compose)"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
    return subprocess.run(
        [docker_compose, "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, variables substituted)."""
    result = compose_config({"DJANGO_SECRET_KEY": "compose-test-secret"})
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def test_docker_compose_config_accepts_the_file(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert set(services) == {"postgres", "redis", *RAMPART_SERVICES}


def test_a_missing_secret_key_fails_before_anything_starts() -> None:
    result = compose_config()
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_postgres_and_redis_have_healthchecks_and_volumes(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    for name, mount in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        service = services[name]
        assert service["healthcheck"]["test"], name
        targets = [_volume_target(volume) for volume in service["volumes"]]
        assert mount in targets, name
    assert {"pgdata", "redisdata"} <= set(rendered["volumes"])


def _volume_target(volume: str | dict[str, Any]) -> str:
    if isinstance(volume, dict):
        return str(volume["target"])
    return volume.split(":")[1]


def test_rampart_services_wait_for_healthy_stores_and_the_migration(
    rendered: dict[str, Any],
) -> None:
    services = rendered["services"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "edge", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    for name in ("web", "edge"):
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"]), name


def test_every_rampart_service_is_built_from_the_dockerfile(rendered: dict[str, Any]) -> None:
    for name in RAMPART_SERVICES:
        service = rendered["services"][name]
        assert Path(service["build"]["context"]).resolve() == ROOT, name
        assert service["environment"]["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
        assert service["environment"]["DATABASE_URL"].startswith("postgres://")
        assert service["environment"]["CELERY_BROKER_URL"].startswith("redis://")


def test_every_environment_variable_is_one_the_settings_read(rendered: dict[str, Any]) -> None:
    read = settings_variables()
    documented = documented_variables()
    for name in RAMPART_SERVICES:
        variables = set(rendered["services"][name]["environment"])
        unknown = variables - read - LIBRARY_VARIABLES
        assert not unknown, f"{name} sets variables no setting reads: {sorted(unknown)}"
        undocumented = variables - documented - LIBRARY_VARIABLES
        assert not undocumented, f"{name} sets variables .env.example lacks: {undocumented}"


def _importable(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    source = Path(spec.origin)
    assert source.is_relative_to(ROOT), f"{module} is not a project module ({source})"
    return ast.parse(source.read_text())


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return True
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
    return False


def check_command(command: list[str]) -> str:
    """Resolve one service command in the project; what it runs, for the assertion message."""
    if command[0] == "uvicorn":
        module, _, attribute = command[1].partition(":")
        assert _defines(_importable(module), attribute), f"{command[1]} is not defined"
        # An --http protocol given as an import path must exist too.
        options = " ".join(command[2:]).replace("--http=", "--http ").split()
        if "--http" in options:
            protocol = options[options.index("--http") + 1]
            if ":" in protocol:
                module, _, attribute = protocol.partition(":")
                assert _defines(_importable(module), attribute), f"{protocol} is not defined"
        return f"uvicorn {command[1]}"
    if command[:2] == ["python", "manage.py"]:
        from django.core.management import get_commands

        assert command[2] in get_commands(), f"no manage.py command {command[2]}"
        return f"manage.py {command[2]}"
    if command[:3] == ["python", "-m", "celery"]:
        app_index = command.index("-A") + 1
        app_module = command[app_index]
        # `celery -A config` loads `config.celery` and takes its `app`.
        assert _defines(_importable(f"{app_module}.celery"), "app"), f"{app_module}.celery:app"
        subcommand = command[app_index + 1]
        assert subcommand in ("worker", "beat"), subcommand
        return f"celery {subcommand}"
    raise AssertionError(f"unrecognised command {command}")


def test_every_service_command_exists_in_the_project(rendered: dict[str, Any]) -> None:
    ran = {name: check_command(rendered["services"][name]["command"]) for name in RAMPART_SERVICES}
    assert ran == {
        "migrate": "manage.py migrate",
        "web": "uvicorn config.asgi:application",
        "edge": "uvicorn config.asgi:application",
        "worker": "celery worker",
        "beat": "celery beat",
    }


def test_the_edge_can_be_scaled_without_port_clashes(rendered: dict[str, Any]) -> None:
    ports = rendered["services"]["edge"]["ports"]
    published = [
        str(port.get("published", "")) if isinstance(port, dict) else port for port in ports
    ]
    # A range of host ports: every replica of `--scale edge=N` takes the next free one.
    assert any(re.search(r"\d+-\d+", value) for value in published), published


def test_servers_coalesce_writes_and_the_edge_keeps_the_peer_address(
    rendered: dict[str, Any],
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    commands = {
        "Dockerfile": ast.literal_eval(cmd.removeprefix("CMD ")),
        **{name: rendered["services"][name]["command"] for name in ("web", "edge")},
    }
    for name, command in commands.items():
        options = " ".join(command).replace("--http=", "--http ").split()
        assert options[options.index("--http") + 1] == "routing.edge.server:EdgeHttpProtocol", name
    # X-Forwarded-For gets the load balancer's address from the proxy itself (see
    # docker-compose.yml): uvicorn must not replace the peer with the forwarded client.
    assert "--no-proxy-headers" in commands["edge"]
    assert "--proxy-headers" not in commands["edge"]


def test_metrics_directories_are_per_container_tmpfs(rendered: dict[str, Any]) -> None:
    for name in ("web", "edge", "worker", "beat"):
        service = rendered["services"][name]
        directory = service["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        assert directory in service["tmpfs"], name


def test_dockerfile_builds_a_non_root_image_with_collected_static_files() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in text.splitlines() if line and line[0].isupper()]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "RUN pip install ." in instructions
    assert "collectstatic --noinput" in text
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    cmd = next(line for line in instructions if line.startswith("CMD "))
    check_command(ast.literal_eval(cmd.removeprefix("CMD ")))
    for path in re.findall(r"^COPY (\S+) ", text, flags=re.MULTILINE):
        assert (ROOT / path).exists(), f"the Dockerfile copies a missing {path}"


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env", "var"} <= ignored
