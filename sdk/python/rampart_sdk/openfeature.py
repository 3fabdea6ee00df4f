"""An OpenFeature provider for Rampart, on ``openfeature-sdk`` (``pip install .[openfeature]``).

Rampart's experiments become OpenFeature flags::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from rampart_sdk import LocalEvaluator
    from rampart_sdk.openfeature import RampartProvider

    evaluator = LocalEvaluator("https://rampart.example.com", "rk_...")  # scope: decide
    api.set_provider(RampartProvider(evaluator))         # initialize() starts the evaluator
    client = api.get_client()
    details = client.get_string_details("ranker-v2", "v1", EvaluationContext("u-42"))
    details.value, details.variant, details.reason        # "v2", "v2", "SPLIT"

* flag key = experiment key; targeting key = unit id; value and variant = the variant key
  the unit gets (the same decision as ``/v1/decide``). Flags are strings: the other types
  answer ``TYPE_MISMATCH`` (and the caller's default), as OpenFeature specifies.
* reasons: ``assigned`` -> ``SPLIT``; ``override`` -> ``TARGETING_MATCH``;
  ``not_in_coverage``, ``not_in_namespace``, ``invalid_config`` -> ``DEFAULT`` (control,
  the experiment's default); ``not_running`` (draft, paused) and ``rolled_back_to_control``
  -> ``DISABLED``; ``completed`` -> ``STATIC`` (the winner, for everyone). Rampart's own
  reason, ``in_experiment`` and ``upstream`` are in ``flag_metadata``.
* errors: an unknown experiment -> ``FLAG_NOT_FOUND``; no targeting key ->
  ``TARGETING_KEY_MISSING``; a bad unit id -> ``INVALID_CONTEXT``; an evaluator without a
  config yet -> ``PROVIDER_NOT_READY``; the edge unreachable (``Client``) -> ``GENERAL``.
  OpenFeature then serves the caller's default value.

Exposures. The edge counts a unit once it was served a variant in the experiment. With a
``LocalEvaluator`` (or ``AsyncLocalEvaluator``) the provider decides with
``decide_untracked`` and its hook (``ExposureHook``, one of the provider's hooks, so every
client runs it) records the exposure in ``after``, that is once OpenFeature has a successful
evaluation to hand to the caller; the evaluator sends it in batches to ``POST
/v1/exposures`` as for its own decisions (``track_exposures`` must be on). With a ``Client``
each resolution is a ``/v1/decide`` call, which records the exposure on the edge itself,
and the hook has nothing to do.

Tracking. OpenFeature's tracking API (``client.track("purchase", context,
TrackingEventDetails(value=19.99))``) becomes a Rampart business event for the targeting
key (``Client.track``, ``POST /v1/events``, scope ``ingest``), so conversions reach the
analysis. Pass ``events=`` a ``Client`` (the ``Client`` source is used when none is given).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import (
    FlagNotFoundError,
    GeneralError,
    InvalidContextError,
    ProviderNotReadyError,
    TargetingKeyMissingError,
    TypeMismatchError,
)
from openfeature.flag_evaluation import FlagEvaluationDetails, FlagResolutionDetails, Reason
from openfeature.hook import Hook, HookContext, HookHints
from openfeature.provider import AbstractProvider, Metadata
from openfeature.track import TrackingEventDetails

from rampart_sdk.client import Client
from rampart_sdk.errors import (
    BadRequestError,
    ExperimentNotFoundError,
    InvalidEventError,
    RampartConnectionError,
    RampartError,
)
from rampart_sdk.evaluator import Evaluator
from rampart_sdk.local import LocalEvaluator
from rampart_sdk.records import Decision

logger = logging.getLogger("rampart_sdk")

PROVIDER_NAME: Final = "rampart"
REASONS: Final[Mapping[str, Reason]] = {
    "assigned": Reason.SPLIT,
    "override": Reason.TARGETING_MATCH,
    "not_in_coverage": Reason.DEFAULT,
    "not_in_namespace": Reason.DEFAULT,
    "invalid_config": Reason.DEFAULT,
    "not_running": Reason.DISABLED,
    "rolled_back_to_control": Reason.DISABLED,
    "completed": Reason.STATIC,
}
# flag_metadata of a decision the provider made locally; the hook records its exposure.
RECORD_EXPOSURE: Final = "rampart_record_exposure"


class ExposureHook(Hook):
    """Records the exposure of a successful local evaluation (see the module docstring)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def after(
        self,
        hook_context: HookContext,
        details: FlagEvaluationDetails[Any],
        hints: HookHints,
    ) -> None:
        metadata = details.flag_metadata
        if not metadata.get(RECORD_EXPOSURE) or not metadata.get("in_experiment"):
            return
        # Cannot raise: an exception in a hook would turn the evaluation into an error.
        self.evaluator.record_exposure(
            Decision(
                experiment=details.flag_key,
                unit=str(metadata["unit"]),
                variant=str(details.value),
                in_experiment=True,
                reason=str(metadata["rampart_reason"]),
                upstream=str(metadata["upstream"]),
            )
        )


class RampartProvider(AbstractProvider):
    """Rampart's experiments as OpenFeature string flags (see the module docstring)."""

    def __init__(self, source: Evaluator | Client, *, events: Client | None = None) -> None:
        super().__init__()
        self.source = source
        self.events = (
            events if events is not None else (source if isinstance(source, Client) else None)
        )
        self._hooks: list[Hook] = [ExposureHook(source)] if isinstance(source, Evaluator) else []

    def get_metadata(self) -> Metadata:
        return Metadata(name=PROVIDER_NAME)

    def get_provider_hooks(self) -> list[Hook]:
        return list(self._hooks)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Start a ``LocalEvaluator`` (fetch the config, then poll); idempotent."""
        if isinstance(self.source, LocalEvaluator):
            self.source.start()

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        unit = evaluation_context.targeting_key if evaluation_context is not None else None
        if not unit:
            raise TargetingKeyMissingError("Rampart needs the unit id as the targeting key")
        decision = self._decide(flag_key, unit)
        return FlagResolutionDetails(
            value=decision.variant,
            variant=decision.variant,
            reason=REASONS.get(decision.reason, Reason.UNKNOWN),
            flag_metadata={
                "unit": decision.unit,
                "in_experiment": decision.in_experiment,
                "rampart_reason": decision.reason,
                "upstream": decision.upstream,
                RECORD_EXPOSURE: isinstance(self.source, Evaluator),
            },
        )

    def _decide(self, flag_key: str, unit: str) -> Decision:
        source = self.source
        try:
            if isinstance(source, Evaluator):
                return source.decide_untracked(flag_key, unit)
            return source.decide(flag_key, unit)
        except ExperimentNotFoundError as error:
            raise FlagNotFoundError(f"no experiment {flag_key!r}: {error}") from error
        except BadRequestError as error:
            raise InvalidContextError(f"targeting key: {error}") from error
        except RampartConnectionError as error:
            raise GeneralError(f"Rampart is unreachable: {error}") from error
        except RampartError as error:
            if isinstance(source, Evaluator) and source.version is None:
                raise ProviderNotReadyError(str(error)) from error
            raise GeneralError(str(error)) from error

    def track(
        self,
        tracking_event_name: str,
        evaluation_context: EvaluationContext | None = None,
        tracking_event_details: TrackingEventDetails | None = None,
    ) -> None:
        """A business event for the targeting key (buffered by ``Client.track``)."""
        unit = evaluation_context.targeting_key if evaluation_context is not None else None
        if self.events is None or not unit:
            logger.warning(
                "rampart: track(%r) ignored: %s",
                tracking_event_name,
                "no events Client given" if self.events is None else "no targeting key",
            )
            return
        value = tracking_event_details.value if tracking_event_details is not None else None
        try:
            if value is None:
                self.events.track(unit, tracking_event_name)
            else:
                self.events.track(unit, tracking_event_name, value)
        except InvalidEventError as error:
            # OpenFeature's track returns nothing and must not break the caller.
            logger.warning("rampart: track(%r) refused: %s", tracking_event_name, error)

    def _mismatch(self, kind: str) -> TypeMismatchError:
        return TypeMismatchError(f"Rampart flags are strings (variant keys), not {kind}")

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        raise self._mismatch("booleans")

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        raise self._mismatch("integers")

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        raise self._mismatch("floats")

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        raise self._mismatch("objects")
