"""Give a user a role: `manage.py rampart_role <username> viewer|experimenter|admin`."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiments import services
from experiments.errors import InvalidInput, NotFound
from experiments.roles import ROLE_SUMMARIES, ROLES


class Command(BaseCommand):
    help = "Give a user the viewer, experimenter or admin role (audited)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("role", choices=ROLES)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            change = services.user_role_assign(
                actor="cli:rampart_role", username=options["username"], role=options["role"]
            )
        except NotFound as exc:
            raise CommandError(f"No user {options['username']!r}.") from exc
        except InvalidInput as exc:
            raise CommandError(str(exc)) from exc
        summary = ROLE_SUMMARIES[change.after]
        if change.changed:
            self.stdout.write(
                f"{change.username} is now {change.after} (was {change.before}): {summary}."
            )
        else:
            self.stdout.write(f"{change.username} already is {change.after}: {summary}.")
