"""Input drift at the proxy: sampled request bodies' watched fields, counted per time bucket.

For an experiment with input drift on (``experiments.services.input_drift``), the user is
the unit (``experiments.input_windows``): a request counts when its unit's stable hash falls
below ``sample_rate`` (so sampling selects users; a request without a unit never counts), the
user counts in its window (its half of the users and, in the reference, its one window) and
this process has not counted it in the window yet (a per-experiment set of the window's users'
hashes, at most ``INPUT_DRIFT_MAX_USERS``; past the cap the window's later new users are left
out and counted in ``rampart_input_drift_dropped_total{cause="users_cap"}``). Such a first
request (any request of the experiment, in it or not) has its JSON body parsed once with
``orjson`` and each watched field read at its path
(``experiments.prediction_path``) into a cell: a number's bin (the configured edges' bin
index, else ``experiments.input_cells.log_cell``, a fixed signed grid of four bins per decade
from 1e-3 to 1e6, so bins never move during an experiment), a category's value (at most
``MAX_CELLS`` distinct per field and bucket, then ``(other)``), or ``(missing)``,
``(wrong_type)``, ``(not_json)``. The cells go to ``routing.observe.inputs.InputRecorder``,
whose flush claims the user in its window once across edge processes and counts the cells
per OBSERVATION_BUCKET_S bucket off the hot path.
Work per request: a CRC-32 of the unit and one comparison; per sampled user's request, one
set lookup; per counted request, one parse and at most 10 path reads.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Final

import orjson
from django.conf import settings

from experiments.contracts import ExperimentView
from experiments.input_cells import log_cell
from experiments.input_windows import InputWindows, sample_cut, unit_hash, windows_for
from experiments.prediction_path import MISSING, PathStep, parse_prediction_path, read_path
from routing.observe.inputs import InputRecorder

MISSING_CELL: Final = "(missing)"
WRONG_TYPE: Final = "(wrong_type)"
NOT_JSON: Final = "(not_json)"
MAX_CATEGORY_CHARS: Final = 100


class InputField:
    __slots__ = ("edges", "kind", "path", "steps")

    def __init__(self, path: str, kind: str, edges: tuple[float, ...] | None) -> None:
        self.path = path
        self.steps: tuple[PathStep, ...] = parse_prediction_path(path)
        self.kind = kind
        self.edges = edges

    def cell(self, value: Any) -> str:
        if value is MISSING:
            return MISSING_CELL
        kind_of = type(value)
        if self.kind == "number":
            if (kind_of is not int and kind_of is not float) or not math.isfinite(value):
                return WRONG_TYPE
            edges = self.edges
            return log_cell(value) if edges is None else str(bisect.bisect_right(edges, value))
        if kind_of is str:
            return value[:MAX_CATEGORY_CHARS]
        if kind_of is dict or kind_of is list:
            return WRONG_TYPE
        return orjson.dumps(value).decode()


class InputPlan:
    """One experiment's watched request fields, compiled for the proxy (``Plan.inputs``)."""

    __slots__ = (
        "_bucket",
        "_window",
        "_window_bounds",
        "bucket_s",
        "cut",
        "experiment_id",
        "fields",
        "max_users",
        "paths",
        "windows",
    )

    def __init__(
        self,
        experiment_id: int,
        fields: tuple[InputField, ...],
        rate: float,
        bucket_s: float,
        windows: InputWindows,
        max_users: int,
    ) -> None:
        self.experiment_id = experiment_id
        self.fields = fields
        self.paths = tuple(field.path for field in fields)
        self.cut = max(1, sample_cut(rate))
        self.bucket_s = bucket_s
        self.windows = windows
        self.max_users = max_users
        self._bucket = math.nan
        self._window: tuple[object, int] | None = None
        self._window_bounds = (0.0, 0.0)

    def capture(self, body: bytes, unit: str | None, recorder: InputRecorder) -> None:
        """Count the watched fields of a sampled user's first request in its window."""
        if unit is None:
            return
        user = unit_hash(unit)
        if user >= self.cut:
            return
        bucket_s = self.bucket_s
        bucket = (time.time() // bucket_s) * bucket_s
        if bucket != self._bucket:  # the bucket's window, worked out once per bucket
            slot = self.windows.slot(bucket)
            self._bucket = bucket
            self._window = None if slot is None else (self.windows.key, slot)
            if slot is not None:
                self._window_bounds = self.windows.bounds(slot)
        window = self._window
        if window is None or not self.windows.counts(window[1], user / self.cut):
            return
        if not recorder.first_in_window(self.experiment_id, window, user, self.max_users):
            return
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            cells = (NOT_JSON,) * len(self.fields)
        else:
            cells = tuple([field.cell(read_path(data, field.steps)) for field in self.fields])
        start, end = self._window_bounds
        recorder.claim((self.experiment_id, start, end, user, bucket, self.paths, cells))


def input_plan(view: ExperimentView) -> InputPlan | None:
    """The compiled input-drift settings of ``view``, or None when the check is off."""
    setting = view.input_drift
    if setting is None:
        return None
    windows = windows_for(
        setting.reference,
        view.started_at,
        reference_s=float(settings.INPUT_DRIFT_REFERENCE_S),
        window_s=float(settings.INPUT_DRIFT_WINDOW_S),
    )
    if windows is None:  # not started: nothing to count yet
        return None
    return InputPlan(
        view.id,
        tuple(InputField(f.path, f.kind, f.edges) for f in setting.fields),
        setting.sample_rate,
        float(settings.OBSERVATION_BUCKET_S),
        windows,
        int(settings.INPUT_DRIFT_MAX_USERS),
    )
