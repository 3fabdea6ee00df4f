"""The Rampart Python SDK: decisions, batched events and local evaluation.

Importing it loads httpx and the pure assignment modules (``rampart_sdk.hashing``,
``rampart_sdk.assignment``), never Django or the rest of the server::

    from rampart_sdk import Client, LocalEvaluator

    with Client("https://rampart.example.com", "rk_...") as rampart:
        decision = rampart.decide("ranker-v2", "u-42")
        rampart.track("u-42", "purchase", 19.99)
        # Later: the truth about a proxied answer, named by its X-Rampart-Request-Id.
        rampart.track_label("5f0c1a2b3c4d-1f", "fraud")

    # Or decide in-process; exposures are reported to the edge in the background.
    with LocalEvaluator("https://rampart.example.com", "rk_...") as evaluator:
        decision = evaluator.decide("ranker-v2", "u-42")
"""

from rampart_sdk._transport import RetryPolicy
from rampart_sdk.client import AsyncClient, Client
from rampart_sdk.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ExperimentNotFoundError,
    ExperimentNotOnEdgeError,
    InvalidEventError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RampartConnectionError,
    RampartError,
    ServerError,
)
from rampart_sdk.evaluator import PollStats
from rampart_sdk.exposures import ExposureResult, ExposureStats
from rampart_sdk.local import AsyncLocalEvaluator, LocalEvaluator
from rampart_sdk.records import Decision, Event, Label, LabelResult, TrackResult

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncLocalEvaluator",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Decision",
    "Event",
    "ExperimentNotFoundError",
    "ExperimentNotOnEdgeError",
    "ExposureResult",
    "ExposureStats",
    "InvalidEventError",
    "Label",
    "LabelResult",
    "LocalEvaluator",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PollStats",
    "RampartConnectionError",
    "RampartError",
    "RetryPolicy",
    "ServerError",
    "TrackResult",
]
