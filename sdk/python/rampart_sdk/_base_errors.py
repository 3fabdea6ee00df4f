"""The SDK's base exception and the one its typed values raise; ``rampart_sdk.errors`` has all.

Apart from ``rampart_sdk.errors`` so that ``rampart_sdk.records`` can raise
``InvalidEventError`` while the errors module refers to its ``Event`` (no import cycle).
Import both from ``rampart_sdk`` or ``rampart_sdk.errors``.
"""

from __future__ import annotations


class RampartError(Exception):
    """Base class of every error the SDK raises."""


class InvalidEventError(RampartError, ValueError):
    """An event that the events API would refuse, caught before it is buffered."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
