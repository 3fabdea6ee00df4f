"""The edge's request and answer bodies as OpenAPI 3 component schemas, as strict as the edge.

``routing.edge.openapi`` adds them, with the edge's operations, to the management API's
schema. Each limit here is the one the edge enforces (a test compares them), so a body the
schema allows is one the edge accepts and one it forbids is refused. Timestamps are the one
moving limit (``timestamp_schema``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from routing.edge.inputs import MAX_UNIT_LENGTH
from routing.edge.problems import TITLES

# Kept in step with routing.edge.app, routing.edge.ingest, routing.edge.labels and
# routing.edge.exposures_api (a test compares).
MAX_BATCH_UNITS: Final = 1000
MAX_EVENTS_PER_BATCH: Final = 10_000
MAX_EXPOSURES_PER_BATCH: Final = 10_000
MAX_KEY_LENGTH: Final = 64
MAX_EVENT_ID_LENGTH: Final = 128
MAX_NAME_LENGTH: Final = 128
MAX_LABELS_PER_BATCH: Final = 10_000
MAX_LABEL_REQUEST_ID_LENGTH: Final = 128
MAX_LABEL_LENGTH: Final = 200
MAX_EPOCH_SECONDS: Final = 253_402_300_800
# orjson reads integers in the 64-bit range as integers and larger ones as floats, which are
# not unit ids.
MIN_INTEGER_UNIT: Final = -(2**63)
MAX_INTEGER_UNIT: Final = 2**64 - 1
LARGEST_DOUBLE: Final = 1.7976931348623157e308


_NO_NUL: Final = "^[^\\u0000]*$"


def schema_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_length,
        "pattern": _NO_NUL,
        "description": description,
    }


UNIT_TEXT: Final = _text(MAX_UNIT_LENGTH, "1-200 characters, no NUL")
UNIT_ID: Final = {
    "description": "A unit id: 1-200 characters without NUL, or an integer (taken as its "
    "decimal string). Must be valid UTF-8: invalid bytes are refused, never replaced.",
    "oneOf": [
        UNIT_TEXT,
        {"type": "integer", "minimum": MIN_INTEGER_UNIT, "maximum": MAX_INTEGER_UNIT},
    ],
}
EXPERIMENT_KEY: Final = {"type": "string", "minLength": 1, "description": "An experiment key."}


def _years_before(year: int) -> str:
    """A regular expression for the years 1000 to ``year - 1``, four digits each."""
    alternatives = ["1[0-9]{3}"]
    for decade in range(2000, year - year % 10, 10):
        alternatives.append(f"{decade // 10}[0-9]")
    if year % 10:
        alternatives.append(f"{year // 10}[0-{year % 10 - 1}]")
    return "(" + "|".join(alternatives) + ")"


def timestamp_schema(now: float, skew_s: float) -> dict[str, Any]:
    """When an event or exposure happened: epoch seconds, or an ISO 8601 string with offset."""
    year = datetime.fromtimestamp(now, UTC).year
    iso = (
        f"^{_years_before(year)}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
        "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?"
        "(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
    )
    # A limit that moves with the clock: exact when generated, and only growing afterwards.
    # A skew reaching past the calendar leaves the calendar's own (fixed) limit.
    epoch: dict[str, Any] = {"type": "number", "minimum": 0}
    if now + skew_s >= MAX_EPOCH_SECONDS:
        epoch.update(maximum=MAX_EPOCH_SECONDS, exclusiveMaximum=True)
    else:
        epoch["maximum"] = float(int(now + skew_s))
    return {
        "description": "Optional; default: the time of receipt. At most EDGE_MAX_CLOCK_SKEW_S "
        "(default 300 s) after the time of receipt, so the epoch maximum below is the limit when "
        "this schema was generated (it grows with time). ISO 8601 strings need an offset; "
        "this schema describes them up to the end of last year (later past times are accepted "
        "too).",
        "oneOf": [
            epoch,
            {"type": "string", "pattern": iso},
        ],
        "nullable": True,
    }


_BUCKET: Final = {"type": "number", "minimum": 0, "maximum": 1}
_VARIANT_KEY: Final = {"type": "string", "description": "A variant key of the experiment."}

# The payload of GET /api/features/{client_key} (routing.edge.features), in the format
# GrowthBook's SDKs read: one feature per experiment, its value a variant key.
GROWTHBOOK_SCHEMAS: Final = {
    "GrowthBookPayload": {
        "type": "object",
        "required": ["features", "experiments", "dateUpdated", "rampart"],
        "properties": {
            "features": {
                "type": "object",
                "description": "One feature per experiment, named by the experiment key.",
                "additionalProperties": schema_ref("GrowthBookFeature"),
            },
            "experiments": {
                "type": "array",
                "maxItems": 0,
                "items": {},
                "description": "Always empty: every experiment is served as a feature.",
            },
            "dateUpdated": {"type": "string", "format": "date-time"},
            "rampart": {
                "type": "object",
                "required": ["format", "version", "hashAttribute", "notes"],
                "properties": {
                    "format": {"type": "integer"},
                    "version": {"type": "integer", "description": "The config version."},
                    "hashAttribute": {"type": "string", "enum": ["id"]},
                    "notes": {
                        "type": "object",
                        "description": "Per experiment key, what GrowthBook could not "
                        "express and how the rules work around it.",
                        "additionalProperties": {"type": "string"},
                    },
                },
            },
        },
    },
    "GrowthBookFeature": {
        "type": "object",
        "required": ["defaultValue", "rules"],
        "properties": {
            "defaultValue": {
                **_VARIANT_KEY,
                "description": "Control, or the winner of a completed experiment.",
            },
            "rules": {
                "type": "array",
                "description": "Forced overrides first, then the experiment rule(s); none "
                "unless the experiment is running.",
                "items": {
                    "oneOf": [
                        schema_ref("GrowthBookForceRule"),
                        schema_ref("GrowthBookExperimentRule"),
                    ]
                },
            },
        },
    },
    "GrowthBookForceRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "condition", "force"],
        "properties": {
            "id": {"type": "string"},
            "condition": {"type": "object", "description": '{"id": {"$in": [unit ids]}}'},
            "force": _VARIANT_KEY,
        },
    },
    "GrowthBookExperimentRule": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "key",
            "seed",
            "hashAttribute",
            "hashVersion",
            "variations",
            "weights",
            "coverage",
            "ranges",
            "meta",
            "disableStickyBucketing",
            "name",
        ],
        "properties": {
            "id": {"type": "string"},
            "key": {"type": "string"},
            "seed": {"type": "string"},
            "hashAttribute": {"type": "string", "enum": ["id"]},
            "hashVersion": {"type": "integer"},
            "variations": {"type": "array", "items": _VARIANT_KEY},
            "weights": {"type": "array", "items": _BUCKET},
            "coverage": _BUCKET,
            "ranges": {
                "type": "array",
                "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": _BUCKET},
            },
            "namespace": {
                "type": "array",
                "minItems": 3,
                "maxItems": 3,
                "items": {"oneOf": [{"type": "string"}, _BUCKET]},
                "description": "[namespace id, start, end]",
            },
            "meta": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "name"],
                    "properties": {"key": {"type": "string"}, "name": {"type": "string"}},
                },
            },
            "disableStickyBucketing": {"type": "boolean", "enum": [True]},
            "name": {"type": "string"},
        },
    },
}


def component_schemas(now: float, skew_s: float) -> dict[str, Any]:
    timestamp = timestamp_schema(now, skew_s)
    error_entry = {
        "type": "object",
        "required": ["field", "code", "message"],
        "properties": {
            "field": {"type": "string", "nullable": True},
            "code": {"type": "string"},
            "message": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
        },
    }
    return {
        "EdgeProblem": {
            "type": "object",
            "description": "RFC 9457 problem details; `code` is one of docs/errors.md. Batch "
            "errors add `index`; 503 `experiment_not_on_edge` adds `retry_after_s`.",
            "required": ["type", "title", "status", "detail", "code", "field", "errors"],
            "properties": {
                "type": {"type": "string", "pattern": "^urn:rampart:problem:[a-z_]+$"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "code": {"type": "string", "enum": sorted(TITLES)},
                "field": {"type": "string", "nullable": True},
                "index": {"type": "integer", "minimum": 0},
                "errors": {"type": "array", "minItems": 1, "items": error_entry},
                "retry_after_s": {"type": "number"},
                "batch_size": {"type": "integer"},
            },
        },
        "EdgeDecision": {
            "type": "object",
            "required": ["experiment", "unit", "variant", "in_experiment", "reason", "upstream"],
            "additionalProperties": False,
            "properties": {
                "experiment": {"type": "string"},
                "unit": {"type": "string", "nullable": True},
                "variant": {"type": "string"},
                "in_experiment": {"type": "boolean"},
                "reason": {
                    "type": "string",
                    "enum": [
                        "assigned",
                        "override",
                        "not_in_coverage",
                        "not_in_namespace",
                        "not_running",
                        "rolled_back_to_control",
                        "completed",
                        "no_unit",
                        "invalid_config",
                    ],
                },
                "upstream": {"type": "string"},
            },
        },
        "EdgeDecideRequest": {
            "type": "object",
            "required": ["experiment", "unit"],
            "additionalProperties": False,
            "properties": {"experiment": EXPERIMENT_KEY, "unit": UNIT_ID},
        },
        "EdgeDecideBatchRequest": {
            "description": "Many units of one experiment, or one unit in every running "
            "experiment (or in the listed ones, whatever their status). Every unit and key is "
            "checked before any decision is recorded.",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["experiment", "units"],
                    "additionalProperties": False,
                    "properties": {
                        "experiment": EXPERIMENT_KEY,
                        "units": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_UNITS,
                            "items": UNIT_ID,
                        },
                    },
                },
                {
                    "type": "object",
                    "required": ["unit"],
                    "additionalProperties": False,
                    "properties": {
                        "unit": UNIT_ID,
                        "experiments": {"type": "array", "items": EXPERIMENT_KEY},
                    },
                },
            ],
        },
        "EdgeDecisions": {
            "type": "object",
            "required": ["decisions"],
            "properties": {"decisions": {"type": "array", "items": schema_ref("EdgeDecision")}},
        },
        "EdgeConfig": {
            "type": "object",
            "description": "The snapshot for SDK local evaluation (format 1; routing.edge.app).",
            "required": ["format", "version", "experiments"],
            "properties": {
                "format": {"type": "integer", "enum": [1]},
                "version": {"type": "integer"},
                "experiments": {"type": "array", "items": {"type": "object"}},
            },
        },
        "EdgeEvent": {
            "type": "object",
            "required": ["event_id", "unit_id", "name"],
            "additionalProperties": False,
            "properties": {
                "event_id": _text(MAX_EVENT_ID_LENGTH, "The idempotency key (1-128)."),
                "unit_id": UNIT_ID,
                "name": _text(MAX_NAME_LENGTH, "The event's name (1-128)."),
                "value": {
                    "type": "number",
                    "nullable": True,
                    "minimum": -LARGEST_DOUBLE,
                    "maximum": LARGEST_DOUBLE,
                    "description": "A finite number; default 1.",
                },
                "timestamp": timestamp,
            },
        },
        "EdgeEventsRequest": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["events"],
                    "additionalProperties": False,
                    "properties": {
                        "events": {
                            "type": "array",
                            "maxItems": MAX_EVENTS_PER_BATCH,
                            "items": schema_ref("EdgeEvent"),
                        }
                    },
                },
                {
                    "type": "array",
                    "maxItems": MAX_EVENTS_PER_BATCH,
                    "items": schema_ref("EdgeEvent"),
                },
            ]
        },
        "EdgeEventsAccepted": {
            "type": "object",
            "required": ["accepted", "duplicates"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "duplicates": {"type": "integer", "minimum": 0},
            },
        },
        "EdgeLabel": {
            "type": "object",
            "required": ["request_id", "label"],
            "additionalProperties": False,
            "properties": {
                "request_id": _text(
                    MAX_LABEL_REQUEST_ID_LENGTH, "The X-Rampart-Request-Id of the answer (1-128)."
                ),
                "label": {
                    "description": "The truth: a class (text of 1-200 characters, an integer"
                    " or a boolean) or a finite number.",
                    "oneOf": [
                        _text(MAX_LABEL_LENGTH, "A class name."),
                        {
                            "type": "number",
                            "minimum": -LARGEST_DOUBLE,
                            "maximum": LARGEST_DOUBLE,
                        },
                        {"type": "boolean"},
                    ],
                },
                "timestamp": timestamp,
            },
        },
        "EdgeLabelsRequest": {
            "type": "object",
            "required": ["labels"],
            "additionalProperties": False,
            "properties": {
                "labels": {
                    "type": "array",
                    "maxItems": MAX_LABELS_PER_BATCH,
                    "items": schema_ref("EdgeLabel"),
                }
            },
        },
        "EdgeLabelsAccepted": {
            "type": "object",
            "required": ["accepted", "duplicates", "unmatched"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "duplicates": {"type": "integer", "minimum": 0},
                "unmatched": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Stored labels whose request id has no recorded prediction"
                    " (yet): unknown, unsampled, or still buffered by the proxy.",
                },
            },
        },
        "EdgeExposure": {
            "type": "object",
            "required": ["experiment", "unit_id", "variant"],
            "additionalProperties": False,
            "properties": {
                "experiment": _text(MAX_KEY_LENGTH, "A running experiment's key."),
                "unit_id": UNIT_ID,
                "variant": _text(MAX_KEY_LENGTH, "The variant the unit was served."),
                "timestamp": timestamp,
            },
        },
        "EdgeExposuresRequest": {
            "type": "object",
            "required": ["exposures"],
            "additionalProperties": False,
            "properties": {
                "exposures": {
                    "type": "array",
                    "maxItems": MAX_EXPOSURES_PER_BATCH,
                    "items": schema_ref("EdgeExposure"),
                }
            },
        },
        "EdgeExposuresAccepted": {
            "type": "object",
            "required": ["accepted", "ignored"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "ignored": {"type": "integer", "minimum": 0},
            },
        },
        **GROWTHBOOK_SCHEMAS,
    }
