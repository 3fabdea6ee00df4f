"""Input drift's windows and users (pure): the split, the reference's one window per user."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from experiments.input_windows import (
    SCALE,
    InputWindows,
    reference_span,
    sample_cut,
    unit_hash,
    windows_for,
)


def test_the_unit_hash_is_stable_and_spreads_sequential_ids() -> None:
    # The same in every process and release: a fixed value, not Python's salted hash().
    assert unit_hash("user-1") == unit_hash("user-1") == 3_051_481_044
    shares = np.array([unit_hash(f"user-{i}") for i in range(20_000)]) / SCALE
    assert abs((shares < 0.1).mean() - 0.1) < 0.01
    assert abs((shares < 0.5).mean() - 0.5) < 0.015
    counts, _ = np.histogram(shares, bins=20, range=(0, 1))
    assert counts.min() > 850 and counts.max() < 1150
    assert sample_cut(1.0) == SCALE and sample_cut(0.25) == SCALE // 4


def test_a_pinned_reference_is_cut_into_whole_windows_and_the_monitoring_follows() -> None:
    windows = InputWindows(reference=(1000.0, 1000.0 + 250.0), started=0.0, window_s=100.0)
    assert (windows.length, windows.reference_windows, windows.origin) == (100.0, 2, 1250.0)
    assert [windows.slot(b) for b in (990.0, 1000.0, 1099.0, 1100.0, 1199.0)] == [
        None,
        -2,
        -2,
        -1,
        -1,
    ]
    assert windows.slot(1200.0) is None  # the reference's partial tail is left out
    assert [windows.slot(b) for b in (1250.0, 1349.0, 1350.0, 5000.0)] == [1, 1, 2, 38]
    assert windows.bounds(-2) == (1000.0, 1100.0) and windows.bounds(2) == (1350.0, 1450.0)
    assert [windows.last_closed(t) for t in (1200.0, 1349.0, 1350.0, 1460.0)] == [0, 0, 1, 2]
    # Monitoring: the upper half; the reference: the lower half, each user in one window.
    shares = np.random.default_rng(3).random(10_000)
    monitored = [s for s in shares if windows.counts(1, s)]
    assert all(s >= 0.5 for s in monitored) and len(monitored) == (shares >= 0.5).sum()
    first = {s for s in shares if windows.counts(-2, s)}
    second = {s for s in shares if windows.counts(-1, s)}
    assert not first & second and not (first | second) & set(monitored)
    assert first | second == {s for s in shares if s < 0.5}
    assert abs(len(first) - len(second)) < 200


def test_a_short_reference_shortens_the_windows_and_training_monitors_everyone() -> None:
    short = InputWindows(reference=(0.0, 30.0), started=0.0, window_s=3600.0)
    assert (short.length, short.reference_windows) == (30.0, 1)
    trained = InputWindows(reference=None, started=500.0, window_s=60.0)
    assert trained.slot(499.0) is None and trained.slot(500.0) == 1 and trained.slot(620.0) == 3
    assert trained.counts(1, 0.1) and trained.counts(1, 0.9)
    with pytest.raises(ValueError):
        InputWindows(reference=(10.0, 10.0), started=0.0, window_s=60.0)


def test_windows_come_from_the_experiment_s_setting() -> None:
    started = datetime(2026, 12, 4, 12, tzinfo=UTC)
    pinned = {"type": "window", "start": "2026-12-04T10:00:00Z", "end": "2026-12-04T11:00:00Z"}
    assert reference_span(pinned, None, 60.0) == (
        datetime(2026, 12, 4, 10, tzinfo=UTC).timestamp(),
        datetime(2026, 12, 4, 11, tzinfo=UTC).timestamp(),
    )
    default = windows_for(None, started, reference_s=7200.0, window_s=600.0)
    assert default is not None and default.reference_start == started.timestamp()
    assert default.reference_windows == 12 and default.origin == started.timestamp() + 7200.0
    assert windows_for(None, None, reference_s=7200.0, window_s=600.0) is None
    training = windows_for({"type": "training"}, started, reference_s=1.0, window_s=600.0)
    assert training is not None and training.reference_start is None
    assert windows_for({"type": "training"}, None, reference_s=1.0, window_s=600.0) is None
