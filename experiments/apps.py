"""Django app configuration for experiments."""

from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments"

    def ready(self) -> None:
        # Registers the OpenAPI description of API-key authentication with drf-spectacular.
        # New users become viewers; missing role groups come back after every migrate.
        from django.conf import settings
        from django.db.models.signals import post_migrate, post_save

        from experiments import roles
        from experiments.api import schema  # noqa: F401

        post_save.connect(
            roles.user_created, sender=settings.AUTH_USER_MODEL, dispatch_uid="rampart-new-user"
        )
        post_migrate.connect(roles.groups_after_migrate, sender=self, dispatch_uid="rampart-roles")
