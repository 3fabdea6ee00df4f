"""Services: the only code that changes experiments, metrics and API keys.

Every lifecycle change is one audited state transition: it takes a row lock, returns early
when the experiment is already in the requested state (so retries and racing workers are
harmless), writes exactly one audit entry and bumps the global config version in the same
transaction, so edges pick the change up on their next snapshot refresh.
"""

from __future__ import annotations

from experiments.services.common import config_version_bump, experiment_state
from experiments.services.definitions import (
    ALWAYS_FIELDS,
    DEFAULT_RAMP,
    LIVE_FIELDS,
    STRUCTURAL_FIELDS,
    WEIGHT_TOLERANCE,
    MetricUseInput,
    RampStepInput,
    VariantInput,
    default_ramp,
    experiment_create,
    experiment_delete,
    experiment_update,
    validate_metric_uses,
    validate_ramp,
    validate_variants,
)
from experiments.services.keys import (
    API_KEY_PREFIX,
    ApiKeyRevocation,
    api_key_create,
    api_key_lockout_warnings,
    api_key_matches,
    api_key_revoke,
    api_key_touch,
    hash_api_secret,
    split_api_key,
)
from experiments.services.lifecycle import (
    ALLOWED_TRANSITIONS,
    TransitionResult,
    experiment_advance_ramp,
    experiment_complete,
    experiment_pause,
    experiment_resume,
    experiment_rollback,
    experiment_start,
)
from experiments.services.metrics import (
    METRIC_FIELDS,
    metric_create,
    metric_delete,
    metric_update,
    validate_metric,
)
from experiments.services.roles import RoleChange, user_role_assign
from experiments.services.shadow_canary import ShadowCanary, canary_from_shadow

__all__ = [
    "ALLOWED_TRANSITIONS",
    "ALWAYS_FIELDS",
    "API_KEY_PREFIX",
    "DEFAULT_RAMP",
    "LIVE_FIELDS",
    "METRIC_FIELDS",
    "STRUCTURAL_FIELDS",
    "WEIGHT_TOLERANCE",
    "ApiKeyRevocation",
    "MetricUseInput",
    "RampStepInput",
    "RoleChange",
    "ShadowCanary",
    "TransitionResult",
    "VariantInput",
    "api_key_create",
    "api_key_lockout_warnings",
    "api_key_matches",
    "api_key_revoke",
    "api_key_touch",
    "canary_from_shadow",
    "config_version_bump",
    "default_ramp",
    "experiment_advance_ramp",
    "experiment_complete",
    "experiment_create",
    "experiment_delete",
    "experiment_pause",
    "experiment_resume",
    "experiment_rollback",
    "experiment_start",
    "experiment_state",
    "experiment_update",
    "hash_api_secret",
    "metric_create",
    "metric_delete",
    "metric_update",
    "split_api_key",
    "user_role_assign",
    "validate_metric",
    "validate_metric_uses",
    "validate_ramp",
    "validate_variants",
]
