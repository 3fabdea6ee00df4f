"""Django app configuration for the analysis pipeline."""

from django.apps import AppConfig


class AnalysisConfig(AppConfig):
    name = "analysis"
    verbose_name = "Analysis"

    def ready(self) -> None:
        from analysis.alerts import alert_on_manual_transition
        from experiments.signals import experiment_transitioned

        experiment_transitioned.connect(
            alert_on_manual_transition, dispatch_uid="analysis.alert_on_manual_transition"
        )
