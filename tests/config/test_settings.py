"""Configuration: every variable the settings read is documented, production fails fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_READ = re.compile(r"""env(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]+)["']""")


def settings_variables() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "config" / "settings").glob("*.py"):
        found |= set(ENV_READ.findall(path.read_text()))
    return found


def documented_variables() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z][A-Z0-9_]*=", line)}


def test_every_variable_the_settings_read_is_in_env_example() -> None:
    read = settings_variables()
    assert "DATABASE_URL" in read and "CELERY_BROKER_URL" in read
    missing = read - documented_variables()
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_every_variable_in_env_example_is_read_somewhere() -> None:
    # Read by Django and prometheus_client themselves, not by our settings modules.
    read_by_libraries = {"DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR"}
    unused = documented_variables() - settings_variables() - read_by_libraries
    assert not unused, f".env.example documents variables nothing reads: {sorted(unused)}"


def test_every_variable_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in sorted(documented_variables()) if f"`{name}`" not in readme]
    assert not missing, f"README does not document {missing}"


def test_production_settings_fail_fast_without_a_secret() -> None:
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "PATH": "/usr/bin:/bin",
        "DJANGO_ALLOWED_HOSTS": "example.com",
        "DJANGO_SECRET_KEY": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_production_settings_load_with_a_secret() -> None:
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "PATH": "/usr/bin:/bin",
        "DJANGO_ALLOWED_HOSTS": "example.com",
        "DJANGO_SECRET_KEY": "x" * 50,
        "RAMPART_DATA_DIR": str(ROOT / "var"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from django.conf import settings; "
            "print(settings.DEBUG, settings.SESSION_COOKIE_SECURE)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
