"""`manage.py analyze KEY`: run the analysis of one experiment now and print it as JSON."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from analysis import services
from analysis.api.serializers import snapshot_data
from experiments.errors import NotFound


class Command(BaseCommand):
    help = "Analyse one running experiment at once (same code as the workers) and print JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="experiment key")

    def handle(self, *args: Any, **options: Any) -> None:
        key = options["key"]
        try:
            result = services.analysis_run_for_key(key=key)
        except NotFound as exc:
            raise CommandError(f"no experiment {key!r}") from exc
        if result is None:
            raise CommandError(f"experiment {key!r} is not running: nothing to analyse")
        data = snapshot_data(result.snapshot, experiment_key=key)
        self.stdout.write(json.dumps(data, indent=2))
