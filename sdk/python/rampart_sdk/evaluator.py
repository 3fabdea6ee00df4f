"""What the sync and async local evaluators share: decisions from the installed config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from rampart_sdk._transport import json_body
from rampart_sdk.errors import BadRequestError, ExperimentNotFoundError, RampartError
from rampart_sdk.exposures import ExposureQueue, ExposureStats
from rampart_sdk.local_config import LocalConfig
from rampart_sdk.records import MAX_UNIT_LENGTH, Decision

logger = logging.getLogger("rampart_sdk")


def _unit_id(unit: Any) -> str:
    """The unit id as the edge accepts it (same rules, same errors)."""
    if unit is None or unit == "":
        raise BadRequestError(400, "validation_error", "unit is required", field="unit")
    if isinstance(unit, bool) or not isinstance(unit, str | int):
        raise BadRequestError(400, "validation_error", "unit must be a string", field="unit")
    text = unit if isinstance(unit, str) else str(unit)
    if len(text) > MAX_UNIT_LENGTH:
        raise BadRequestError(
            400,
            "validation_error",
            f"unit is longer than {MAX_UNIT_LENGTH} characters",
            field="unit",
        )
    return text


@dataclass(frozen=True, slots=True)
class PollStats:
    """Config fetches since start: new documents, 304 answers, failed polls."""

    fetched: int
    not_modified: int
    failed: int


class Evaluator:
    """Decisions from the installed config; shared by the sync and async evaluators."""

    def __init__(self, refresh_s: float, exposures: ExposureQueue | None) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self.refresh_s = refresh_s
        self._exposures = exposures
        self._config: LocalConfig | None = None
        # The installed config's deciders, read once per decision (decide's hot path).
        self._deciders: dict[str, Callable[[str], Decision]] = {}
        self._etag: str | None = None
        self._fetched = 0
        self._not_modified = 0
        self._failed = 0

    @property
    def version(self) -> int | None:
        """The config version in use (None before the first fetch)."""
        config = self._config
        return None if config is None else config.version

    @property
    def etag(self) -> str | None:
        return self._etag

    @property
    def stats(self) -> PollStats:
        return PollStats(self._fetched, self._not_modified, self._failed)

    @property
    def exposure_stats(self) -> ExposureStats:
        """Exposures queued, sent and lost (all zero when ``track_exposures`` is off)."""
        exposures = self._exposures
        return ExposureStats(0, 0, 0, 0, 0) if exposures is None else exposures.stats

    @property
    def experiments(self) -> list[str]:
        """Keys of the experiments in the config, sorted."""
        return sorted(self._loaded().routes)

    def decide(self, experiment: str, unit: str | int) -> Decision:
        """The variant ``unit`` gets in ``experiment``, decided in-process.

        Raises ExperimentNotFoundError (a NotFoundError) for an experiment not in the config
        last polled and BadRequestError for a missing,
        non-string or too long unit id, as the edge answers them.
        """
        try:
            decide = self._deciders[experiment]
        except KeyError:
            raise self._unknown(experiment) from None
        if type(unit) is str and 0 < len(unit) <= MAX_UNIT_LENGTH:
            return decide(unit)
        return decide(_unit_id(unit))

    def decide_untracked(self, experiment: str, unit: str | int) -> Decision:
        """``decide`` without queuing the exposure: for callers that record it themselves,
        once the decision is used (``record_exposure``; the OpenFeature provider's hook)."""
        route = self._loaded().routes.get(experiment)
        if route is None:
            raise self._unknown(experiment)
        if type(unit) is str and 0 < len(unit) <= MAX_UNIT_LENGTH:
            return route.decide(unit)
        return route.decide(_unit_id(unit))

    def record_exposure(self, decision: Decision) -> bool:
        """Queue the exposure of a ``decide_untracked`` decision for sending, as ``decide``
        would have; True when queued. Nothing for a unit not in the experiment, a unit
        already sent with this variant, or an evaluator without ``track_exposures``."""
        exposures = self._exposures
        if exposures is None or not exposures.sending or not decision.in_experiment:
            return False
        return exposures.offer(decision.experiment, decision.unit, decision.variant)

    def decide_all(
        self, unit: str | int, experiments: Iterable[str] | None = None
    ) -> dict[str, Decision]:
        """Decisions for ``unit`` in the given experiments, or in every running one."""
        config = self._loaded()
        if experiments is None:
            keys = sorted(key for key, route in config.routes.items() if route.is_running)
        else:
            keys = list(experiments)
        return {key: self.decide(key, unit) for key in keys}

    def _unknown(self, experiment: str) -> RampartError:
        if self._config is None:
            return RampartError("the local evaluator has no config yet: start it first")
        return ExperimentNotFoundError(
            404,
            "experiment_not_found",
            f"unknown experiment {experiment!r} in config version {self._config.version} "
            f"(polled every {self.refresh_s:g} s: an experiment created since is not known yet)",
            field="experiment",
        )

    def _loaded(self) -> LocalConfig:
        config = self._config
        if config is None:
            raise RampartError("the local evaluator has no config yet: start it first")
        return config

    def _conditional_headers(self) -> dict[str, str]:
        return {} if self._etag is None else {"If-None-Match": self._etag}

    def _install(self, response: httpx.Response) -> bool:
        """Take a /v1/config answer; True when a new document was installed."""
        if response.status_code == 304:
            self._not_modified += 1
            return False
        config = LocalConfig(json_body(response), self._exposures)
        # One assignment each: a concurrent decide() sees the old or the new config whole.
        self._config = config
        self._deciders = config.deciders
        self._etag = response.headers.get("etag")
        self._fetched += 1
        return True

    def _poll_failed(self, error: Exception) -> None:
        self._failed += 1
        logger.warning("rampart: config poll failed (still on version %s): %s", self.version, error)

    def _unsent_at_close(self, exposures: ExposureQueue, error: RampartError) -> None:
        # close() runs on the way out, often in a finally block: it logs instead of raising.
        left = exposures.discard()
        logger.error("rampart: exposures not sent at close (%d dropped): %s", left, error)
