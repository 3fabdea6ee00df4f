"""Test settings: the same database choice as base, fast password hashing."""

from config.settings.base import *  # noqa: F403
from config.settings.base import DATA_DIR, DATABASES

SECRET_KEY = "test-only-key"
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Tests that start an edge, a worker or a browser in another process need a file database
# that those processes can open, so the SQLite test database is a file, not :memory:.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
