"""Create (or reset) the demo superuser so a first-time user can log in at once."""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from experiments import services


class Command(BaseCommand):
    help = "Create or reset a superuser for the demo (default admin / rampart-demo)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password", default="rampart-demo")
        parser.add_argument("--email", default="admin@example.com")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(
            username=options["username"], defaults={"email": options["email"]}
        )
        user.is_staff = True
        user.is_superuser = True
        user.set_password(options["password"])
        user.save()
        # A superuser is an admin anyway; the group makes the role visible in the admin too.
        services.user_role_assign(
            actor="cli:createdemoadmin", username=options["username"], role="admin"
        )
        verb = "Created" if created else "Reset"
        self.stdout.write(f"{verb} demo login {options['username']} / {options['password']}")
