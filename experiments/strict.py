"""Strict DRF input: unknown fields are refused by name, integers keep their column's bounds.

Shared by the REST APIs of every app (the `analysis` app may not import `experiments.api`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail, ValidationError

# The range of an integer column (PostgreSQL's int4; SQLite would store
# more, so the API holds both backends to the smaller one and never reaches the database
# with a value PostgreSQL refuses with "integer out of range").
INT4_MAX = 2**31 - 1

UNKNOWN_FIELD = "unknown_field"
READ_ONLY_FIELD = "read_only_field"


class RefuseUnknownFieldsMixin:
    """Every key of the request object must be a writable field of the serializer.

    Nested serializers inherit it, so `variants[1].colour` is named as precisely as `colour`.
    Unknown fields are reported together with the other errors of the same object.
    """

    fields: Any

    def to_internal_value(self, data: Any) -> Any:
        extra: dict[str, list[ErrorDetail]] = {}
        if isinstance(data, Mapping):
            for name in data:
                field = self.fields.get(name)
                if field is None:
                    extra[str(name)] = [ErrorDetail("Unknown field.", code=UNKNOWN_FIELD)]
                elif field.read_only:
                    extra[str(name)] = [
                        ErrorDetail("This field is read-only.", code=READ_ONLY_FIELD)
                    ]
        try:
            value = super().to_internal_value(data)  # type: ignore[misc]
        except ValidationError as exc:
            if extra and isinstance(exc.detail, dict):
                raise ValidationError({**exc.detail, **extra}) from None
            raise
        if extra:
            raise ValidationError(extra)
        return value


class StrictSerializer(RefuseUnknownFieldsMixin, serializers.Serializer):  # type: ignore[type-arg]
    """A request body serializer that refuses unknown fields."""


class StrictModelSerializer(RefuseUnknownFieldsMixin, serializers.ModelSerializer):  # type: ignore[type-arg]
    """A model serializer that refuses unknown and read-only fields in requests."""


class EmptyBodySerializer(StrictSerializer):
    """The body of an action that takes no input: nothing, `{}`, or a 400 naming each field."""


class UnitIdDictField(serializers.DictField):  # type: ignore[type-arg]
    """A map keyed by unit id: keys are non-empty, at most 200 characters, without NUL."""

    MAX_KEY_LENGTH = 200

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value = super().to_internal_value(data)
        errors: dict[str, list[ErrorDetail]] = {}
        for key in value:
            text = str(key)
            if "\x00" in text:
                errors[text] = [ErrorDetail("Keys may not contain NUL.", code="null_characters")]
            elif not text.strip():
                errors[text] = [ErrorDetail("Keys must not be empty.", code="blank")]
            elif len(text) > self.MAX_KEY_LENGTH:
                errors[text] = [
                    ErrorDetail(
                        f"Keys may have at most {self.MAX_KEY_LENGTH} characters.",
                        code="max_length",
                    )
                ]
        if errors:
            raise ValidationError(errors)
        return value
