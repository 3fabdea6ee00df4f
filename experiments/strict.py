"""Strict DRF input: unknown fields are refused by name, integers keep their column's bounds.

Shared by the REST APIs of every app (the `analysis` app may not import `experiments.api`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import pagination, serializers
from rest_framework.exceptions import ErrorDetail, ValidationError

# The range of an integer column (PostgreSQL's int4; SQLite would store
# more, so the API holds both backends to the smaller one and never reaches the database
# with a value PostgreSQL refuses with "integer out of range").
INT4_MAX = 2**31 - 1

# Exactly the keys that django.utils.text.slugify leaves unchanged (the services' rule):
# lowercase ASCII letters, digits, "-" and "_", no "--", starting and ending with a letter or
# digit. Stated as a pattern so that the OpenAPI schema says it (checked against slugify in
# tests/experiments/test_api_contract.py).
SLUG_PATTERN = r"^[a-z0-9]+(?:_*(?:-_+)*(?:-_*)?[a-z0-9]+)*$"
SLUG_MESSAGE = "Use lowercase letters, digits, - and _."

UNKNOWN_FIELD = "unknown_field"
READ_ONLY_FIELD = "read_only_field"


INVALID_TYPE = "invalid_type"


def json_type_error(field: serializers.Field, value: Any) -> ErrorDetail | None:  # type: ignore[type-arg]
    """The error when `value` is not of the JSON type the schema documents for `field`.

    DRF coerces (`0` to "0", "12" to 12, 0 to False); a client that sends the wrong type has
    a bug worth telling it about, and the OpenAPI schema promises the type.
    """
    if value is None:
        return None  # allow_null decides
    if isinstance(field, serializers.BooleanField):
        ok, expected = isinstance(value, bool), "a boolean"
    elif isinstance(field, serializers.IntegerField):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(field, serializers.FloatField):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif isinstance(field, serializers.CharField | serializers.ChoiceField):
        ok, expected = isinstance(value, str), "a string"
    else:
        return None
    return None if ok else ErrorDetail(f"Must be {expected}.", code=INVALID_TYPE)


class TypedChildMixin:
    """For the child of a DictField or ListField: refuse values of the wrong JSON type."""

    def to_internal_value(self, data: Any) -> Any:
        error = json_type_error(self, data)  # type: ignore[arg-type]
        if error is not None:
            raise ValidationError([error])
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictCharField(TypedChildMixin, serializers.CharField):
    pass


class StrictFloatField(TypedChildMixin, serializers.FloatField):
    pass


class RefuseUnknownFieldsMixin:
    """Every key of the request object must be a writable field of the serializer, of its type.

    Nested serializers inherit it, so `variants[1].colour` is named as precisely as `colour`.
    Unknown fields are reported together with the other errors of the same object. A nested
    object inside a PATCH is validated whole (required fields and defaults apply): a partial
    update replaces a list of variants or ramp steps, it does not patch one of them.
    """

    fields: Any
    root: Any

    def to_internal_value(self, data: Any) -> Any:
        if self.root is not self and getattr(self.root, "partial", False):
            whole = type(self)(data=data)  # type: ignore[call-arg]
            whole.is_valid(raise_exception=True)
            return whole.validated_data
        extra: dict[str, list[ErrorDetail]] = {}
        if isinstance(data, Mapping):
            for name, value in data.items():
                field = self.fields.get(name)
                if field is None:
                    extra[str(name)] = [ErrorDetail("Unknown field.", code=UNKNOWN_FIELD)]
                elif field.read_only:
                    extra[str(name)] = [
                        ErrorDetail("This field is read-only.", code=READ_ONLY_FIELD)
                    ]
                elif (error := json_type_error(field, value)) is not None:
                    extra[str(name)] = [error]
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


class StrictPageNumberPagination(pagination.PageNumberPagination):
    """`?page=` must be a positive integer (400 otherwise); a page past the end stays a 404."""

    def get_page_number(self, request: Any, paginator: Any) -> Any:
        raw = request.query_params.get(self.page_query_param)
        if raw is not None and not (raw.isascii() and raw.isdigit() and int(raw) >= 1):
            raise ValidationError({self.page_query_param: ["Must be a positive integer."]})
        return super().get_page_number(request, paginator)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"]["minimum"] = 1
        return parameters


def slug_field(**kwargs: Any) -> serializers.RegexField:
    """A key of an experiment, variant or metric (at most 64 characters, SLUG_PATTERN)."""
    return serializers.RegexField(
        SLUG_PATTERN, max_length=64, error_messages={"invalid": SLUG_MESSAGE}, **kwargs
    )
