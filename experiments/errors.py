"""Domain errors raised by experiment services; interfaces map them to HTTP or form errors."""

from collections.abc import Mapping, Sequence


class DomainError(Exception):
    """Base class of errors a caller can act on."""


class InvalidInput(DomainError):
    """Input that breaks a rule; `errors` maps each wrong field to its messages."""

    def __init__(self, errors: Mapping[str, Sequence[str]]) -> None:
        self.errors = {field: list(messages) for field, messages in errors.items()}
        super().__init__("; ".join(f"{f}: {' '.join(m)}" for f, m in self.errors.items()))


class NotFound(DomainError):
    def __init__(self, entity: str, key: object) -> None:
        self.entity = entity
        self.key = key
        super().__init__(f"{entity} {key!r} does not exist")


class InvalidTransition(DomainError):
    """A lifecycle action that the experiment's current state does not allow."""

    def __init__(self, current: str, requested: str, action: str) -> None:
        self.current = current
        self.requested = requested
        self.action = action
        super().__init__(f"cannot {action}: experiment is {current}, {requested} is not allowed")


class NotEditable(DomainError):
    """A change to fields that are frozen in the experiment's current state."""

    def __init__(self, status: str, fields: Sequence[str]) -> None:
        self.status = status
        self.fields = list(fields)
        super().__init__(f"fields {', '.join(self.fields)} cannot change while {status}")


class LockoutRisk(DomainError):
    """Revoking this API key could lock its holders out; the caller must confirm.

    `warnings` says why: it is the key making the request, or the last active key with the
    manage scope.
    """

    def __init__(self, prefix: str, warnings: Sequence[str]) -> None:
        self.prefix = prefix
        self.warnings = list(warnings)
        super().__init__(" ".join(self.warnings))


class InUse(DomainError):
    """An object that cannot be deleted while other objects refer to it."""

    def __init__(self, entity: str, key: object, used_by: str) -> None:
        self.entity = entity
        self.key = key
        self.used_by = used_by
        super().__init__(f"{entity} {key!r} is used by {used_by}")
