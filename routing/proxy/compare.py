"""Whether a shadow's answer agrees with control's: the paired comparison shadows record."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, TypeGuard

import orjson

# What control's answer to a mirrored request resolves to: (body, content encoding, latency in
# ms), or None when control gave no body to compare (failure, stream, another arm answered).
ControlAnswer = asyncio.Future[tuple[bytes, bytes, float | None] | None]


def compare_answers(
    control_body: bytes,
    shadow_body: bytes,
    *,
    field: str = "",
    control_encoding: bytes = b"",
    shadow_encoding: bytes = b"",
) -> tuple[bool, float | None]:
    """Whether a shadow's answer disagrees with control's, and |difference| of a numeric field.

    With ``field`` set and both bodies JSON objects (after undoing gzip/deflate), the field's
    values are compared, and for two numbers their absolute difference is returned. Otherwise
    the bodies are compared byte for byte and the difference is None.
    """
    if field:
        control_data = _json_object(control_body, control_encoding)
        shadow_data = _json_object(shadow_body, shadow_encoding)
        if control_data is not None and shadow_data is not None:
            control_value = control_data.get(field)
            shadow_value = shadow_data.get(field)
            if _is_number(control_value) and _is_number(shadow_value):
                difference = abs(float(shadow_value) - float(control_value))
                return difference != 0.0, difference
            return control_value != shadow_value, None
    return control_body != shadow_body, None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_object(body: bytes, encoding: bytes) -> dict[str, Any] | None:
    try:
        if encoding in (b"gzip", b"x-gzip"):
            body = zlib.decompress(body, wbits=31)
        elif encoding == b"deflate":
            body = zlib.decompress(body)
        elif encoding:
            return None
        data = orjson.loads(body)
    except (zlib.error, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
