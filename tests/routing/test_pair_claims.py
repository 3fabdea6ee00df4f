"""One shadow pair per user across edge processes: claims settled by the database's unique key."""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any

import pytest

from experiments import services
from routing.models import ObservationBucket, ShadowPairClaim
from routing.observe.observations import ObservationAggregator
from routing.observe.pair_claims import HeldPair, PairClaims
from routing.observe.shadow_pairs import PairCell


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pair(control_ms: float = 10.0, shadow_ms: float = 12.0) -> HeldPair:
    return HeldPair("s1", 170_000_000, control_ms, shadow_ms, False, None)


def test_pairs_wait_for_their_claim_then_count_if_it_was_won() -> None:
    claims = PairClaims(clock=FakeClock(100.0))
    claims.claim(1, "s1", "ann")
    claims.claim(1, "s1", "bob")
    claims.claim(1, "s1", "ann")  # the same user and shadow again: one claim
    assert len(claims) == 2
    assert claims.offer(1, "ann", _pair()) is False  # held
    written = claims.drain()
    assert sorted((e, k, u) for e, k, u, _ in written) == [(1, "s1", "ann"), (1, "s1", "bob")]
    assert claims.offer(1, "bob", _pair(20.0, 30.0)) is False  # held while being written
    assert claims.held == 2
    counted = claims.settle(written, won={(1, "s1", "ann")})
    assert counted == [(1, _pair())]  # bob's claim was lost: its pair is dropped
    assert claims.held == 0
    # Pairs arriving after the claim was settled (a retry of the same user).
    assert claims.offer(1, "ann", _pair(11.0, 11.0)) is True
    assert claims.offer(1, "bob", _pair(11.0, 11.0)) is False
    # A settled user is never claimed again for that shadow by this process.
    claims.claim(1, "s1", "ann")
    assert len(claims) == 0
    # A pair whose claim this process never made does not count: another experiment, or
    # another shadow of the same user.
    assert claims.offer(2, "ann", _pair()) is False and claims.held == 0
    other_shadow = HeldPair("s2", 170_000_000, 10.0, 12.0, False, None)
    assert claims.offer(1, "ann", other_shadow) is False and claims.held == 0


def test_claims_are_per_shadow_so_a_shadow_added_later_pairs_known_users() -> None:
    claims = PairClaims(clock=FakeClock(100.0))
    claims.claim(1, "s1", "ann")
    claims.settle(claims.drain(), won={(1, "s1", "ann")})
    # s2 joins the experiment: ann's first request mirrored to it is her pair with s2.
    claims.claim(1, "s2", "ann")
    assert len(claims) == 1
    late = HeldPair("s2", 170_000_000, 10.0, 30.0, True, None)
    assert claims.offer(1, "ann", late) is False  # held until the s2 claim is settled
    written = claims.drain()
    assert [claim[:3] for claim in written] == [(1, "s2", "ann")]
    assert claims.settle(written, won={(1, "s2", "ann")}) == [(1, late)]


def test_a_failed_claim_write_keeps_the_claims_and_their_pairs() -> None:
    claims = PairClaims(clock=FakeClock(100.0))
    claims.claim(1, "s1", "ann")
    claims.offer(1, "ann", _pair())
    written = claims.drain()
    claims.restore(written)
    assert len(claims) == 1 and claims.held == 1
    again = claims.drain()
    assert claims.settle(again, won={(1, "s1", "ann")}) == [(1, _pair())]


def test_settled_outcomes_are_forgotten_after_keep_s() -> None:
    clock = FakeClock(100.0)
    claims = PairClaims(clock=clock, keep_s=60.0)
    claims.claim(1, "s1", "ann")
    claims.settle(claims.drain(), won={(1, "s1", "ann")})
    clock.now = 161.0
    claims.claim(1, "s1", "bob")
    claims.settle(claims.drain(), won=set())  # pruning runs on every settle
    assert claims.offer(1, "ann", _pair()) is False  # too late: ann's outcome is gone


def test_rows_written_before_the_ratio_histogram_stay_readable() -> None:
    cell = PairCell()
    cell.add(10.0, 15.0, disagreed=False, abs_diff=None)
    data = json.loads(cell.to_json())
    assert data["hr"]["n"] == 1
    del data["hr"]  # a row of the earlier format
    old = PairCell.from_dict(data)
    assert old.n == 1 and old.ratio.count == 0
    old.merge(cell)
    assert old.n == 2 and old.ratio.count == 1
    assert old.ratio.quantile(0.5) == pytest.approx(1.5, rel=0.01)


def _experiment(key: str) -> int:
    experiment = services.experiment_create(
        actor="test",
        key=key,
        name=key,
        kind="ab",
        variants=[
            services.VariantInput(
                key="v1", upstream_url="http://127.0.0.1:9001", weight=0.5, is_control=True
            ),
            services.VariantInput(key="v2", upstream_url="http://127.0.0.1:9002", weight=0.5),
            services.VariantInput(
                key="s1", upstream_url="http://127.0.0.1:9003", weight=0.0, is_shadow=True
            ),
            services.VariantInput(
                key="s2", upstream_url="http://127.0.0.1:9004", weight=0.0, is_shadow=True
            ),
        ],
    )
    return int(experiment.id)


def _recorder(clock: FakeClock, **overrides: Any) -> ObservationAggregator:
    options: dict[str, Any] = {"bucket_s": 10, "flush_interval_s": 60.0, "max_cells": 1000}
    options.update(overrides)
    return ObservationAggregator(clock=clock, **options)


def _stored_pairs(experiment_id: int) -> dict[str, PairCell]:
    totals: dict[str, PairCell] = {}
    rows = ObservationBucket.objects.filter(experiment_id=experiment_id, is_shadow=True)
    for variant, text in rows.exclude(pairs="").values_list("variant_key", "pairs"):
        totals.setdefault(variant, PairCell()).merge(PairCell.from_json(text))
    return totals


def _mirror(recorder: ObservationAggregator, experiment_id: int, unit: str, ms: float) -> None:
    """What ``routing.proxy.shadow`` does for a user's first mirrored request: claim a pair per
    shadow, then compare each shadow's answer with control's."""
    for shadow in ("s1", "s2"):
        recorder.claim_pair(experiment_id, shadow, unit)
    for shadow in ("s1", "s2"):
        recorder.compare(
            experiment_id,
            shadow,
            disagreed=False,
            control_ms=ms,
            shadow_ms=ms * 1.5,
            pair_unit=unit,
        )


@pytest.mark.django_db(transaction=True)
def test_two_recorders_flushing_the_same_user_count_one_pair_per_shadow() -> None:
    experiment_id = _experiment("claims-two")
    clock = FakeClock(1_700_000_003.0)
    first, second = _recorder(clock), _recorder(clock)
    # Both edge processes see ann first; bob only on the second; cid on the first.
    _mirror(first, experiment_id, "ann", 10.0)
    _mirror(second, experiment_id, "ann", 40.0)
    _mirror(second, experiment_id, "bob", 20.0)
    _mirror(first, experiment_id, "cid", 30.0)
    first.flush_now()
    second.flush_now()
    assert sorted(
        ShadowPairClaim.objects.filter(experiment_id=experiment_id).values_list(
            "variant_key", "unit_id"
        )
    ) == [(shadow, unit) for shadow in ("s1", "s2") for unit in ("ann", "bob", "cid")]
    pairs = _stored_pairs(experiment_id)
    for shadow in ("s1", "s2"):
        # ann's pair from the first process (its claim was written first) and none other.
        assert pairs[shadow].n == 3
        assert pairs[shadow].c == pytest.approx(10.0 + 20.0 + 30.0)
        assert pairs[shadow].ratio.count == 3
    # Every compared request still counts in the request-level fields (context).
    compared = sum(
        ObservationBucket.objects.filter(experiment_id=experiment_id).values_list(
            "compared_count", flat=True
        )
    )
    assert compared == 8
    # A later pair of ann on the second process (a retry, another shadow) still does not count.
    second.compare(
        experiment_id, "s1", disagreed=True, control_ms=5.0, shadow_ms=5.0, pair_unit="ann"
    )
    second.flush_now()
    assert _stored_pairs(experiment_id)["s1"].n == 3


@pytest.mark.django_db(transaction=True)
def test_async_flushes_settle_claims_first_and_count_pairs_arriving_later() -> None:
    experiment_id = _experiment("claims-async")
    clock = FakeClock(1_700_000_003.0)
    first, second = _recorder(clock), _recorder(clock)

    async def scenario() -> None:
        # Both processes choose dan's pair; the second's claim reaches the database first,
        # before either shadow answered.
        for shadow in ("s1", "s2"):
            first.claim_pair(experiment_id, shadow, "dan")
            second.claim_pair(experiment_id, shadow, "dan")
        await second.flush()
        await first.flush()
        # The answers arrive after the claims were settled.
        for recorder, ms in ((first, 10.0), (second, 70.0)):
            recorder.compare(
                experiment_id, "s1", disagreed=False, control_ms=ms, shadow_ms=ms, pair_unit="dan"
            )
        # A failed shadow answer of the winner's other shadow is a pair that differs.
        second.pair_failure(experiment_id, "s2", control_ms=70.0, shadow_ms=900.0, pair_unit="dan")
        await first.stop()
        await second.stop()

    asyncio.run(scenario())
    pairs = _stored_pairs(experiment_id)
    assert pairs["s1"].n == 1 and pairs["s1"].c == pytest.approx(70.0)
    assert pairs["s2"].n == 1 and pairs["s2"].d == 1 and pairs["s2"].s == pytest.approx(900.0)


@pytest.mark.django_db(transaction=True)
def test_claims_of_a_deleted_experiment_are_skipped() -> None:
    experiment_id = _experiment("claims-kept")
    clock = FakeClock(1_700_000_003.0)
    recorder = _recorder(clock)
    recorder.claim_pair(experiment_id, "s1", "eve")
    recorder.claim_pair(experiment_id + 1000, "s1", "eve")  # no such experiment
    recorder.settle_claims_now()
    assert list(ShadowPairClaim.objects.values_list("experiment_id", "unit_id")) == [
        (experiment_id, "eve")
    ]
    assert len(recorder.pair_claims) == 0


@pytest.mark.django_db(transaction=True)
def test_a_shadow_added_later_gets_the_pairs_of_users_paired_with_another() -> None:
    experiment_id = _experiment("claims-later")
    clock = FakeClock(1_700_000_003.0)
    first, second = _recorder(clock), _recorder(clock)
    first.claim_pair(experiment_id, "s1", "fay")
    first.compare(
        experiment_id, "s1", disagreed=False, control_ms=10.0, shadow_ms=10.0, pair_unit="fay"
    )
    first.flush_now()
    # s2 starts later; another edge process mirrors fay's next request to both shadows.
    second.claim_pair(experiment_id, "s1", "fay")  # lost: the first process had it
    second.claim_pair(experiment_id, "s2", "fay")  # won: fay's first pair with s2
    for shadow, shadow_ms in (("s1", 50.0), ("s2", 80.0)):
        second.compare(
            experiment_id,
            shadow,
            disagreed=True,
            control_ms=20.0,
            shadow_ms=shadow_ms,
            pair_unit="fay",
        )
    second.flush_now()
    pairs = _stored_pairs(experiment_id)
    assert (pairs["s1"].n, pairs["s1"].c, pairs["s1"].d) == (1, pytest.approx(10.0), 0)
    assert (pairs["s2"].n, pairs["s2"].c, pairs["s2"].d) == (1, pytest.approx(20.0), 1)


@pytest.mark.django_db
def test_claims_from_before_shadow_keys_become_one_per_shadow_and_back() -> None:
    from django.apps import apps

    per_shadow = importlib.import_module("routing.migrations.0012_shadow_pair_claims_per_shadow")
    experiment_id = _experiment("claims-migrated")
    ShadowPairClaim.objects.bulk_create(
        ShadowPairClaim(experiment_id=experiment_id, variant_key="", unit_id=unit, claimed_at=at)
        for unit, at in (("ann", 5.0), ("bob", 7.0))
    )
    per_shadow.claims_per_shadow(apps, None)
    assert sorted(ShadowPairClaim.objects.values_list("variant_key", "unit_id", "claimed_at")) == [
        ("s1", "ann", 5.0),
        ("s1", "bob", 7.0),
        ("s2", "ann", 5.0),
        ("s2", "bob", 7.0),
    ]
    per_shadow.claims_per_user(apps, None)
    assert sorted(ShadowPairClaim.objects.values_list("variant_key", "unit_id")) == [
        ("", "ann"),
        ("", "bob"),
    ]
