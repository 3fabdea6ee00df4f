"""Django app configuration for experiments."""

from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments"

    def ready(self) -> None:
        # Registers the OpenAPI description of API-key authentication with drf-spectacular.
        from experiments.api import schema  # noqa: F401
