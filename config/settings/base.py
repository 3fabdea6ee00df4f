"""Settings shared by every environment, read from environment variables (12-factor).

Every variable read here is listed, with its default, in `.env.example` and the README.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parents[2]

env = environ.Env()

DATA_DIR = Path(env("RAMPART_DATA_DIR", default=str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env("DJANGO_SECRET_KEY", default="")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Public URL of the web app, used for links in alerts.
RAMPART_BASE_URL = env("RAMPART_BASE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "experiments",
    "routing",
    "analysis",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "experiments.roles.role_context",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"


def _database_from_env() -> dict[str, object]:
    """PostgreSQL when DATABASE_URL names it, otherwise SQLite in WAL mode (default file)."""
    url = env("DATABASE_URL", default="")
    if url and not url.startswith("sqlite"):
        database: dict[str, object] = env.db_url_config(url)
        database["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
        database["CONN_HEALTH_CHECKS"] = True
        return database
    name = env.db_url_config(url)["NAME"] if url else str(DATA_DIR / "rampart.sqlite3")
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": name,
        # The edge's recorder threads flush every second: reopening SQLite each time re-runs
        # the pragmas and starts from a cold page cache, which doubled the cost of a row.
        "CONN_MAX_AGE": env.int("DATABASE_CONN_MAX_AGE", default=60),
        "OPTIONS": {
            # WAL lets the edge, the web app and the workers read while one of them writes;
            # IMMEDIATE takes the write lock at BEGIN, which is what makes a read-check-write
            # transition atomic on SQLite, where SELECT ... FOR UPDATE does not exist.
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;"
            ),
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
    }


DATABASES = {"default": _database_from_env()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]

# A failed CSRF check answers problem+json under /api/ (HTML elsewhere, as before).
CSRF_FAILURE_VIEW = "experiments.api.errors.csrf_failure"

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "experiments.api.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["experiments.api.permissions.RolePermission"],
    # The API speaks JSON only: form encodings cannot carry its nested bodies, and a parser
    # the schema advertises must accept everything the schema allows.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_PAGINATION_CLASS": "experiments.strict.StrictPageNumberPagination",
    "PAGE_SIZE": 50,
    # drf-spectacular's AutoSchema plus the problem+json error responses of each operation.
    "DEFAULT_SCHEMA_CLASS": "experiments.api.schema.ProblemAutoSchema",
    "EXCEPTION_HANDLER": "experiments.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Rampart management API",
    "DESCRIPTION": "Experiments, metrics, API keys, lifecycle actions and audit log of Rampart.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Public unless API_DOCS_PUBLIC is false (checked per request by ApiDocsAccess).
    "SERVE_PERMISSIONS": ["experiments.api.permissions.ApiDocsAccess"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Keep drf-spectacular's default hook first; more hooks (e.g. the edge's operations) append.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "experiments.api.schema.refuse_unknown_request_fields",
        "experiments.api.schema.link_created_objects",
        # The edge's operations, described as data (plain ASGI, so drf-spectacular cannot
        # see them).
        "routing.edge.openapi.add_edge_operations",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ExperimentKindEnum": "experiments.models.ExperimentKind",
        "MetricKindEnum": "experiments.models.MetricKind",
    },
}

# Celery: the embedded default is kombu's filesystem transport, which needs no server.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("out", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport, with each message written whole before it is visible.
    CELERY_BROKER_TRANSPORT = "config.broker:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "processed_folder": str(_broker_dir / "processed"),
        # Broadcast (pidbox) messages, which kombu otherwise keeps in ./control.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# Workers serve GET /metrics on this port when it is not 0 (they have no web server).
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=0)
WORKER_METRICS_HOST = env("WORKER_METRICS_HOST", default="127.0.0.1")
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- edge: snapshot, recorder, proxy ---------------------------------------------------
# How often each edge process checks the config version (seconds).
SNAPSHOT_REFRESH_S = env.float("SNAPSHOT_REFRESH_S", default=1.0)
# Buffered writes: flush at least this often, or when this many rows are waiting.
RECORDER_FLUSH_S = env.float("RECORDER_FLUSH_S", default=1.0)
RECORDER_BATCH_ROWS = env.int("RECORDER_BATCH_ROWS", default=5000)
# Rows held in memory at most while the database is unreachable; past it rows are dropped
# and counted.
RECORDER_MAX_BUFFER = env.int("RECORDER_MAX_BUFFER", default=200_000)
# While flushes fail (the database is down), the next attempt waits a capped exponential
# backoff with jitter, from about RECORDER_BACKOFF_BASE_S up to RECORDER_BACKOFF_MAX_S; the
# failures are logged once per RECORDER_FAILURE_LOG_S with counts.
RECORDER_BACKOFF_BASE_S = env.float("RECORDER_BACKOFF_BASE_S", default=1.0)
RECORDER_BACKOFF_MAX_S = env.float("RECORDER_BACKOFF_MAX_S", default=10.0)
RECORDER_FAILURE_LOG_S = env.float("RECORDER_FAILURE_LOG_S", default=30.0)
# Units remembered per process as already exposed, so repeat requests write nothing.
EXPOSURE_CACHE_SIZE = env.int("EXPOSURE_CACHE_SIZE", default=1_000_000)
# Width of the proxy's pre-aggregation buckets (seconds).
OBSERVATION_BUCKET_S = env.int("OBSERVATION_BUCKET_S", default=10)
# Rate guardrails take the user as the unit: a user's outcome is the share of its requests
# that failed within these windows after its first request (analysis.rate_guardrails).
RATE_WINDOW_FAST_S = env.float("RATE_WINDOW_FAST_S", default=3.0)
RATE_WINDOW_SLOW_S = env.float("RATE_WINDOW_SLOW_S", default=60.0)
# Input drift: the default reference (the experiment's first seconds), the window (a user
# counts once per window; each closed window is tested), and the users an edge process
# remembers per experiment and window (past it, the window's later new users are not counted).
INPUT_DRIFT_REFERENCE_S = env.float("INPUT_DRIFT_REFERENCE_S", default=86400.0)
INPUT_DRIFT_WINDOW_S = env.float("INPUT_DRIFT_WINDOW_S", default=3600.0)
INPUT_DRIFT_MAX_USERS = env.int("INPUT_DRIFT_MAX_USERS", default=100_000)
PROXY_CONNECT_TIMEOUT_S = env.float("PROXY_CONNECT_TIMEOUT_S", default=2.0)
PROXY_READ_TIMEOUT_S = env.float("PROXY_READ_TIMEOUT_S", default=10.0)
# The whole proxied request, retry on control included, answers within this many seconds.
PROXY_DEADLINE_S = env.float("PROXY_DEADLINE_S", default=15.0)
PROXY_POOL_LIMIT = env.int("PROXY_POOL_LIMIT", default=1000)
PROXY_POOL_LIMIT_PER_HOST = env.int("PROXY_POOL_LIMIT_PER_HOST", default=200)
PROXY_MAX_BODY_BYTES = env.int("PROXY_MAX_BODY_BYTES", default=10 * 1024 * 1024)
PROXY_BREAKER_FAILURES = env.int("PROXY_BREAKER_FAILURES", default=5)
PROXY_BREAKER_COOLDOWN_S = env.float("PROXY_BREAKER_COOLDOWN_S", default=10.0)
PROXY_SHADOW_CONCURRENCY = env.int("PROXY_SHADOW_CONCURRENCY", default=64)
# Require an API key with the `decide` scope on /v1/decide and /proxy/ (`ingest` on events).
EDGE_REQUIRE_KEY = env.bool("EDGE_REQUIRE_KEY", default=True)
# How far into the future an event's or exposure's timestamp may lie (client clock skew);
# later ones are refused with 400 naming the field and the item.
EDGE_MAX_CLOCK_SKEW_S = env.float("EDGE_MAX_CLOCK_SKEW_S", default=300.0)
# Slow clients (routing.edge.server): a request's headers must arrive within EDGE_HEADER_TIMEOUT_S
# and its body within EDGE_BODY_TIMEOUT_S; one process holds at most EDGE_MAX_CONNECTIONS.
EDGE_HEADER_TIMEOUT_S = env.float("EDGE_HEADER_TIMEOUT_S", default=10.0)
EDGE_BODY_TIMEOUT_S = env.float("EDGE_BODY_TIMEOUT_S", default=10.0)
EDGE_MAX_CONNECTIONS = env.int("EDGE_MAX_CONNECTIONS", default=4096)

# --- analysis and alerts ------------------------------------------------------------------
ANALYSIS_INTERVAL_S = env.float("ANALYSIS_INTERVAL_S", default=10.0)
SLACK_WEBHOOK_URL = env("SLACK_WEBHOOK_URL", default="")
ALERT_MAX_ATTEMPTS = env.int("ALERT_MAX_ATTEMPTS", default=12)
ALERT_BACKOFF_BASE_S = env.float("ALERT_BACKOFF_BASE_S", default=2.0)
ALERT_BACKOFF_MAX_S = env.float("ALERT_BACKOFF_MAX_S", default=300.0)
# Shadow verdicts (analysis.shadow_verdicts): a shadow is "ready to canary" when, paired with
# control on the same requests, its mean latency rises by less than SHADOW_MAX_LATENCY_INCREASE,
# its p95 by less than SHADOW_MAX_P95_INCREASE and its answers differ on less than
# SHADOW_MAX_DISAGREEMENT of requests (each with confidence); "worse" when one is surely beyond.
SHADOW_MAX_LATENCY_INCREASE = env.float("SHADOW_MAX_LATENCY_INCREASE", default=0.10)
SHADOW_MAX_P95_INCREASE = env.float("SHADOW_MAX_P95_INCREASE", default=0.20)
SHADOW_MAX_DISAGREEMENT = env.float("SHADOW_MAX_DISAGREEMENT", default=0.05)
SHADOW_MIN_PAIRS = env.int("SHADOW_MIN_PAIRS", default=200)
# Beat: analyse every running experiment and sweep due alerts every ANALYSIS_INTERVAL_S.
CELERY_BEAT_SCHEDULE = {
    name: {
        "task": task,
        "schedule": ANALYSIS_INTERVAL_S,
        "options": {"expires": ANALYSIS_INTERVAL_S},
    }
    for name, task in (("analysis", "analysis.fan_out"), ("alerts", "analysis.deliver_alerts"))
}

# --- access ------------------------------------------------------------------------------
# When set, GET /metrics (edge, web app, worker metrics port) requires
# `Authorization: Bearer <METRICS_TOKEN>`; empty leaves it open (see README, Operations).
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# False: /api/schema/ and /api/docs/ need a logged-in user or a key with the read scope.
# Production defaults to false (config.settings.production).
API_DOCS_PUBLIC = env.bool("API_DOCS_PUBLIC", default=True)

LOG_FORMAT = env("LOG_FORMAT", default="text")
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
# Text, or JSON lines with request id / experiment / variant (config.logging). Celery keeps
# its own root handler only in text mode, so that worker lines are JSON too.
from config.logging import logging_config  # noqa: E402

LOGGING = logging_config(LOG_FORMAT, LOG_LEVEL)
CELERY_WORKER_HIJACK_ROOT_LOGGER = LOG_FORMAT != "json"
