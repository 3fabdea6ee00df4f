"""Test settings: the same database choice as base, fast password hashing."""

import os

from config.settings.base import *  # noqa: F403
from config.settings.base import DATA_DIR, DATABASES

SECRET_KEY = "test-only-key"
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Tests that start an edge, a worker or a browser in another process need a file database
# that those processes can open, so the SQLite test database is a file, not :memory:.
# Each test session gets its own test database (by process id), so that two suites run at
# once on one machine (developers, helpers, CI legs) never drop each other's database.
_session = os.getpid()
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-{_session}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{_session}"}
