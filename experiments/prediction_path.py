"""Where a prediction sits in a model's JSON answer: a small path syntax, parsed once.

A path is a dot-separated list of object keys, each optionally followed by array indices,
with an optional leading ``$``: ``label``, ``$.output.class``, ``predictions[0].scores``,
``[0]`` (the first element of an answer that is a list). Keys hold any character but
``.``, ``[`` and ``]``. That covers the answers of the common serving stacks (TF Serving's
``predictions[0]``, KServe v1 ``predictions[0]``, a bare ``{"label": ...}``) without the
cost and surprises of a full JSONPath engine (filters, wildcards) on the hot path.

Pure: no framework, so the experiment validation and the proxy share one parser.
"""

from __future__ import annotations

from typing import Any, Final

PathStep = str | int
MAX_PATH_LENGTH: Final = 200
MAX_INDEX: Final = 1_000_000
# What read_path returns for an absent value (JSON null is a value: None).
MISSING: Final = object()


class PathError(ValueError):
    """A path that cannot be parsed; the message says why, for the API's field error."""


def parse_prediction_path(text: str) -> tuple[PathStep, ...]:
    """The steps of ``text``: strings are object keys, integers array indices."""
    if not text or not text.strip():
        raise PathError("Name the field that holds the prediction, e.g. 'label'.")
    if len(text) > MAX_PATH_LENGTH:
        raise PathError(f"At most {MAX_PATH_LENGTH} characters.")
    rest = text
    if rest.startswith("$"):
        rest = rest[1:]
        if rest.startswith("."):
            rest = rest[1:]
        elif rest and not rest.startswith("["):
            raise PathError("After '$' comes '.' or '['.")
        if not rest:
            raise PathError("'$' alone is the whole answer; name a field in it.")
    steps: list[PathStep] = []
    for part_index, part in enumerate(rest.split(".")):
        key, bracket, indices = part.partition("[")
        if key:
            if "]" in key:
                raise PathError(f"Unbalanced ']' in {part!r}.")
            steps.append(key)
        elif not bracket or part_index > 0:
            raise PathError("Empty key: two dots in a row, or a dot at either end.")
        if bracket:
            steps.extend(_indices("[" + indices))
    return tuple(steps)


def _indices(text: str) -> list[int]:
    """``[0][2]`` -> [0, 2]."""
    found: list[int] = []
    while text:
        if not text.startswith("["):
            raise PathError(f"Expected '[' in {text!r}.")
        close = text.find("]")
        if close < 0:
            raise PathError(f"Unclosed '[' in {text!r}.")
        digits = text[1:close]
        if not digits.isascii() or not digits.isdigit():
            raise PathError(f"An array index is a non-negative integer, not {digits!r}.")
        index = int(digits)
        if index > MAX_INDEX:
            raise PathError(f"Array index {index} is too large.")
        found.append(index)
        text = text[close + 1 :]
    return found


def read_path(data: Any, steps: tuple[PathStep, ...]) -> Any:
    """The value at ``steps`` in parsed JSON ``data``, or ``MISSING`` when it is absent."""
    value = data
    for step in steps:
        if isinstance(step, str):
            if type(value) is not dict:
                return MISSING
            value = value.get(step, MISSING)
            if value is MISSING:
                return MISSING
        else:
            if type(value) is not list or step >= len(value):
                return MISSING
            value = value[step]
    return value
