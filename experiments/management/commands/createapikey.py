"""Create an API key and print it; the key itself is alone on the last line."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiments import services
from experiments.errors import InvalidInput


class Command(BaseCommand):
    help = "Create an API key. The secret is printed once, alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument(
            "--scopes", required=True, help="Comma-separated: manage,decide,ingest,read,sdk"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scopes = [s.strip() for s in options["scopes"].split(",") if s.strip()]
        try:
            key, secret = services.api_key_create(
                actor="cli:createapikey", name=options["name"], scopes=scopes
            )
        except InvalidInput as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Created key {key.prefix} ({', '.join(key.scopes)}) for {key.name}:")
        self.stdout.write(secret)
