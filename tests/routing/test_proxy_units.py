"""Pure parts of the proxy: the circuit breaker, the prediction cache, shadow comparison."""

from __future__ import annotations

import gzip

import orjson
import pytest

from routing.proxy.breaker import CircuitBreaker
from routing.proxy.cache import PredictionCache
from routing.proxy.compare import compare_answers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: FakeClock, changes: list[str] | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        "http://model",
        failure_threshold=3,
        cooldown_s=5.0,
        clock=clock,
        on_change=None if changes is None else (lambda _name, state: changes.append(state)),
    )


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    subject = breaker(clock)
    for _ in range(2):
        subject.record_failure()
    subject.record_success()  # the run of failures is broken
    for _ in range(2):
        subject.record_failure()
    assert subject.state == "closed" and subject.allow()
    subject.record_failure()
    assert subject.state == "open"
    assert not subject.allow()


def test_breaker_lets_one_probe_through_per_cooldown_and_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[str] = []
    subject = breaker(clock, changes)
    for _ in range(3):
        subject.record_failure()
    clock.now += 4.9
    assert not subject.allow()
    clock.now += 0.1
    assert subject.allow()  # the probe
    assert subject.state == "half_open"
    assert not subject.allow()  # everyone else waits for the probe's outcome
    subject.record_failure()  # the probe failed: open for another cooldown
    assert subject.state == "open"
    clock.now += 4.0
    assert not subject.allow()
    clock.now += 1.0
    assert subject.allow()
    subject.record_success()
    assert subject.state == "closed" and subject.allow() and subject.allow()
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_a_lost_probe_does_not_wedge_the_breaker() -> None:
    clock = FakeClock()
    subject = breaker(clock)
    for _ in range(3):
        subject.record_failure()
    clock.now += 5.0
    assert subject.allow()  # a probe whose outcome never comes (its client left)
    clock.now += 4.0
    assert not subject.allow()
    clock.now += 1.0
    assert subject.allow()


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0, cooldown_s=1.0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker("x", failure_threshold=1, cooldown_s=-1.0)


def test_cache_expires_entries_and_evicts_the_least_recently_used() -> None:
    cache = PredictionCache(ttl_s=10, max_entries=2)
    a, b, c = (("v1", "POST", "/p", bytes([i])) for i in range(3))
    for key in (a, b):
        cache.put(key, now=0.0, status=200, headers=[(b"x", b"1")], body=b"answer")
    assert cache.get(a, 1.0) is not None  # a is now the most recently used
    cache.put(c, now=2.0, status=200, headers=(), body=b"c")
    assert cache.get(b, 2.0) is None  # evicted
    hit = cache.get(a, 9.9)
    assert hit is not None and (hit.status, hit.headers, hit.body) == (
        200,
        ((b"x", b"1"),),
        b"answer",
    )
    assert cache.get(a, 10.0) is None  # expired exactly at put time + ttl
    assert len(cache) == 1


def test_whole_body_comparison() -> None:
    assert compare_answers(b'{"a":1}', b'{"a":1}') == (False, None)
    assert compare_answers(b'{"a":1}', b'{"a": 1}') == (True, None)


def test_numeric_field_comparison_gives_the_absolute_difference() -> None:
    control = orjson.dumps({"score": 0.5, "request_id": "abc"})
    shadow = orjson.dumps({"score": 0.875, "request_id": "xyz"})
    disagreed, difference = compare_answers(control, shadow, field="score")
    assert disagreed
    assert difference == pytest.approx(0.375)
    same = orjson.dumps({"score": 0.5, "request_id": "other"})
    assert compare_answers(control, same, field="score") == (False, 0.0)


def test_non_numeric_field_and_compressed_bodies() -> None:
    control = gzip.compress(orjson.dumps({"label": "cat", "p": 0.9}))
    shadow = orjson.dumps({"label": "dog", "p": 0.9})
    assert compare_answers(
        control, shadow, field="label", control_encoding=b"gzip", shadow_encoding=b""
    ) == (True, None)
    assert compare_answers(
        control, shadow, field="p", control_encoding=b"gzip", shadow_encoding=b""
    ) == (False, 0.0)
    # Not JSON (or an encoding we do not undo): fall back to comparing the bytes.
    assert compare_answers(b"not json", b"not json", field="p") == (False, None)
    assert compare_answers(b"x", b"x", field="p", control_encoding=b"br") == (False, None)
