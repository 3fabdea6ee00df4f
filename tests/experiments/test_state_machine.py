"""Every pair of lifecycle states: the allowed transitions happen, the others are refused."""

from __future__ import annotations

import itertools

import pytest

from experiments import services
from experiments.errors import InvalidInput, InvalidTransition
from experiments.models import AuditEntry, ConfigVersion, Experiment, ExperimentStatus
from tests.factories import create_experiment

S = ExperimentStatus
STATES = [S.DRAFT, S.RUNNING, S.PAUSED, S.COMPLETED, S.ROLLED_BACK]
EXPECTED_ALLOWED = {
    (S.DRAFT, S.RUNNING),
    (S.RUNNING, S.PAUSED),
    (S.PAUSED, S.RUNNING),
    (S.RUNNING, S.COMPLETED),
    (S.PAUSED, S.COMPLETED),
    (S.RUNNING, S.ROLLED_BACK),
    (S.PAUSED, S.ROLLED_BACK),
}


def _bring_to(key: str, state: str) -> None:
    if state == S.DRAFT:
        return
    services.experiment_start(actor="t", key=key)
    if state == S.PAUSED:
        services.experiment_pause(actor="t", key=key)
    elif state == S.COMPLETED:
        services.experiment_complete(actor="t", key=key, winner_key="v2")
    elif state == S.ROLLED_BACK:
        services.experiment_rollback(actor="t", key=key, reason="test")


def _move(key: str, current: str, target: str) -> services.TransitionResult:
    if target == S.RUNNING:
        if current == S.PAUSED:
            return services.experiment_resume(actor="t", key=key)
        return services.experiment_start(actor="t", key=key)
    if target == S.PAUSED:
        return services.experiment_pause(actor="t", key=key)
    if target == S.COMPLETED:
        return services.experiment_complete(actor="t", key=key, winner_key="v2")
    if target == S.ROLLED_BACK:
        return services.experiment_rollback(actor="t", key=key, reason="breach")
    raise AssertionError(target)


def test_state_machine_table_matches_the_spec() -> None:
    table = {(a, b) for a, targets in services.ALLOWED_TRANSITIONS.items() for b in targets}
    assert table == EXPECTED_ALLOWED


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("current", "target"),
    [(a, b) for a, b in itertools.product(STATES, STATES) if a != b and b != S.DRAFT],
)
def test_every_pair_of_states(metrics: object, current: str, target: str) -> None:
    create_experiment("exp")
    _bring_to("exp", current)
    audits_before = AuditEntry.objects.count()
    version_before = ConfigVersion.objects.get(pk=1).version
    if (current, target) in EXPECTED_ALLOWED:
        result = _move("exp", current, target)
        assert result.changed
        assert Experiment.objects.get(key="exp").status == target
        assert AuditEntry.objects.count() == audits_before + 1
        assert ConfigVersion.objects.get(pk=1).version == version_before + 1
    else:
        with pytest.raises(InvalidTransition) as excinfo:
            _move("exp", current, target)
        assert excinfo.value.current == current
        assert excinfo.value.requested == target
        assert Experiment.objects.get(key="exp").status == current
        assert AuditEntry.objects.count() == audits_before
        assert ConfigVersion.objects.get(pk=1).version == version_before


@pytest.mark.django_db
@pytest.mark.parametrize("state", [S.RUNNING, S.PAUSED, S.COMPLETED, S.ROLLED_BACK])
def test_repeating_a_transition_is_a_no_op(metrics: object, state: str) -> None:
    create_experiment("exp")
    _bring_to("exp", state)
    audits = AuditEntry.objects.count()
    previous = {S.RUNNING: S.DRAFT, S.PAUSED: S.RUNNING}.get(state, S.RUNNING)
    result = _move("exp", previous, state)
    assert not result.changed
    assert AuditEntry.objects.count() == audits


@pytest.mark.django_db
def test_draft_cannot_be_deleted_once_started(metrics: object) -> None:
    create_experiment("exp")
    services.experiment_start(actor="t", key="exp")
    with pytest.raises(InvalidTransition):
        services.experiment_delete(actor="t", key="exp")


@pytest.mark.django_db
def test_rollback_needs_a_reason(metrics: object) -> None:
    create_experiment("exp")
    services.experiment_start(actor="t", key="exp")
    with pytest.raises(InvalidInput) as excinfo:
        services.experiment_rollback(actor="t", key="exp", reason="  ")
    assert "reason" in excinfo.value.errors


@pytest.mark.django_db
def test_start_freezes_seed_and_enters_first_ramp_step(metrics: object) -> None:
    create_experiment("exp")
    services.experiment_start(actor="t", key="exp")
    experiment = Experiment.objects.get(key="exp")
    assert experiment.seed == "exp"
    assert experiment.ramp_position == 0
    assert experiment.started_at is not None


@pytest.mark.django_db
def test_ramp_advances_step_by_step_then_completes_with_canary(metrics: object) -> None:
    create_experiment("exp")
    services.experiment_start(actor="t", key="exp")
    steps = Experiment.objects.get(key="exp").ramp_steps.count()
    for expected in range(1, steps):
        assert services.experiment_advance_ramp(actor="t", key="exp").changed
        assert Experiment.objects.get(key="exp").ramp_position == expected
    # A racing worker that saw an older step does nothing.
    assert not services.experiment_advance_ramp(actor="t", key="exp", from_position=0).changed
    result = services.experiment_advance_ramp(actor="t", key="exp")
    experiment = Experiment.objects.get(key="exp")
    assert result.changed
    assert experiment.status == S.COMPLETED
    assert experiment.winner is not None and experiment.winner.key == "v2"
    advances = AuditEntry.objects.filter(experiment=experiment, action="advance").count()
    assert advances == steps - 1
