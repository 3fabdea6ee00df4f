"""Logging configuration: plain text by default, one JSON object per line when LOG_FORMAT=json.

``logging_config`` returns the dict that ``config.settings.base`` puts in ``LOGGING``. In
JSON mode every record carries ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
the request context bound by the edge (``request_id``, ``experiment``, ``variant``: see
``routing.logcontext``), the ``extra={...}`` fields given to the logging call, and the
formatted traceback under ``exc_info``. uvicorn's own loggers are routed to the same handler,
so the access log is JSON too.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from routing import logcontext

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON with the request context of ``routing.logcontext``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(logcontext.current())
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an ``extra`` value that JSON cannot hold (a datetime, a UUID, a model)
        # is logged as its str() rather than losing the whole line.
        return orjson.dumps(entry, default=str).decode()


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The ``LOGGING`` dict for ``log_format`` (``text`` or ``json``) at ``level``."""
    if log_format not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT must be text or json, not {log_format!r}")
    formatters: dict[str, dict[str, Any]] = {"text": {"format": TEXT_FORMAT}}
    if log_format == "json":
        formatters["json"] = {"()": "config.logging.JsonFormatter"}
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": log_format}},
        "root": {"handlers": ["console"], "level": level},
        # Django's default config gives "django" its own console handler when DEBUG is on,
        # which printed every warning twice (there and through root): root alone is enough.
        "loggers": {"django": {"handlers": [], "propagate": True}},
    }
    if log_format == "json":
        # uvicorn installs its own text handlers before it imports the app; hand its records
        # to the root handler instead so that every line of the process is JSON.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            config["loggers"][name] = {"handlers": [], "propagate": True}
    return config
