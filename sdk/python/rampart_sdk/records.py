"""Typed values of the Rampart SDK: decisions, events, labels and the edge's counts."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from rampart_sdk._base_errors import InvalidEventError

# The events API's limits (routing.edge.ingest); checked here so that a bad event fails in the
# caller's track() instead of taking its whole batch down later.
MAX_EVENT_ID_LENGTH: Final = 128
MAX_UNIT_LENGTH: Final = 200
MAX_NAME_LENGTH: Final = 128
# The labels API's limits (routing.edge.labels).
MAX_REQUEST_ID_LENGTH: Final = 128
MAX_LABEL_LENGTH: Final = 200


@dataclass(frozen=True, slots=True)
class Decision:
    """The variant served to one unit, as the edge's /v1/decide answers it.

    ``variant`` is the key served (control when the unit is not in the experiment),
    ``upstream`` its URL, ``in_experiment`` whether the unit counts for the analysis, and
    ``reason`` one of ``assigned``, ``override``, ``not_in_coverage``, ``not_in_namespace``,
    ``not_running``, ``rolled_back_to_control``, ``completed``, ``invalid_config``.
    """

    experiment: str
    unit: str
    variant: str
    in_experiment: bool
    reason: str
    upstream: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(
            experiment=data["experiment"],
            unit=data["unit"],
            variant=data["variant"],
            in_experiment=data["in_experiment"],
            reason=data["reason"],
            upstream=data["upstream"],
        )


# A frozen dataclass's __init__ sets each field through object.__setattr__, about 1 us for
# Decision's six fields. Local evaluation builds one Decision per call, so it fills the
# slots through their descriptors instead, in about half the time; the object is the
# same ordinary, immutable, comparable Decision.
_allocate = object.__new__
_set_experiment = Decision.__dict__["experiment"].__set__
_set_unit = Decision.__dict__["unit"].__set__
_set_variant = Decision.__dict__["variant"].__set__
_set_in_experiment = Decision.__dict__["in_experiment"].__set__
_set_reason = Decision.__dict__["reason"].__set__
_set_upstream = Decision.__dict__["upstream"].__set__


def fast_decision(
    experiment: str, unit: str, variant: str, in_experiment: bool, reason: str, upstream: str
) -> Decision:
    """``Decision(experiment, unit, variant, in_experiment, reason, upstream)``, faster."""
    decision: Decision = _allocate(Decision)
    _set_experiment(decision, experiment)
    _set_unit(decision, unit)
    _set_variant(decision, variant)
    _set_in_experiment(decision, in_experiment)
    _set_reason(decision, reason)
    _set_upstream(decision, upstream)
    return decision


def new_event_id() -> str:
    """A random event id (UUID 4): retries of the same event reuse it, so it is stored once."""
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """One business event. Its id and timestamp are fixed when it is created.

    ``timestamp`` defaults to the moment of creation, not of sending, because events wait
    in a buffer. ``unit_id`` may be given as an integer; it is kept as its decimal string,
    as the edge does.
    """

    unit_id: str
    name: str
    value: float = 1.0
    timestamp: datetime = field(default_factory=_now)
    event_id: str = field(default_factory=new_event_id)

    def __post_init__(self) -> None:
        unit_id: Any = self.unit_id
        if isinstance(unit_id, int) and not isinstance(unit_id, bool):
            object.__setattr__(self, "unit_id", str(unit_id))
        _check_text("unit_id", self.unit_id, MAX_UNIT_LENGTH)
        _check_text("name", self.name, MAX_NAME_LENGTH)
        _check_text("event_id", self.event_id, MAX_EVENT_ID_LENGTH)
        value: Any = self.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidEventError("value", "must be a number")
        if not math.isfinite(value):
            raise InvalidEventError("value", "must be finite")
        timestamp: Any = self.timestamp
        if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
            raise InvalidEventError("timestamp", "must be an aware datetime (with a tzinfo)")

    def as_json(self) -> dict[str, Any]:
        """The event as the events API takes it."""
        return {
            "event_id": self.event_id,
            "unit_id": self.unit_id,
            "name": self.name,
            "value": self.value,
            "timestamp": self.timestamp.isoformat(),
        }


def _check_text(field_name: str, value: Any, max_length: int) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidEventError(field_name, "must be a non-empty string")
    if len(value) > max_length:
        raise InvalidEventError(field_name, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise InvalidEventError(field_name, "must not contain NUL characters")


@dataclass(frozen=True, slots=True)
class TrackResult:
    """Events the server stored (``accepted``) and ignored as already stored (``duplicates``)."""

    accepted: int = 0
    duplicates: int = 0

    def __add__(self, other: TrackResult) -> TrackResult:
        return TrackResult(self.accepted + other.accepted, self.duplicates + other.duplicates)


@dataclass(frozen=True, slots=True)
class Label:
    """The true outcome of one proxied request, named by its ``X-Rampart-Request-Id``.

    ``label`` is a class (a string, an integer or a boolean) or a finite number;
    ``timestamp`` is when the truth became known (default: when the Label is made).
    """

    request_id: str
    label: str | int | float | bool
    timestamp: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        _check_text("request_id", self.request_id, MAX_REQUEST_ID_LENGTH)
        label: Any = self.label
        if isinstance(label, str):
            _check_text("label", label, MAX_LABEL_LENGTH)
        elif isinstance(label, float):
            if not math.isfinite(label):
                raise InvalidEventError("label", "must be finite")
        elif not isinstance(label, int):
            raise InvalidEventError("label", "must be a string, a number or a boolean")
        timestamp: Any = self.timestamp
        if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
            raise InvalidEventError("timestamp", "must be an aware datetime (with a tzinfo)")

    def as_json(self) -> dict[str, Any]:
        """The label as the labels API takes it."""
        return {
            "request_id": self.request_id,
            "label": self.label,
            "timestamp": self.timestamp.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class LabelResult:
    """Labels stored, ignored (their request id had one) and stored without a prediction."""

    accepted: int = 0
    duplicates: int = 0
    unmatched: int = 0

    def __add__(self, other: LabelResult) -> LabelResult:
        return LabelResult(
            self.accepted + other.accepted,
            self.duplicates + other.duplicates,
            self.unmatched + other.unmatched,
        )
