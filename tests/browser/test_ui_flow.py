"""The on-call engineer's path through the UI in a real browser, against the real server.

Log in, create a canary through the form (fixing a validation error on the way), start it,
let the analysis service digest real traffic rows, read the results table and the charts,
roll the canary back with a reason, and find the rollback in the audit log. Screenshots of
the main pages land in var/screenshots/ (test artifacts); with RAMPART_UPDATE_SCREENSHOTS=1
the list, form and experiment pictures are also copied to docs/screenshots/ (README).
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import User

from analysis import services as analysis_services
from experiments import services
from experiments.models import AuditEntry, Experiment
from tests.analysis.conftest import later, traffic
from tests.browser.conftest import SCREENSHOTS
from tests.processes import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "rollout-on-call-2024"
ROLLBACK_REASON = "p95 latency creeping up on v2; rolling back to look at the new tokenizer"

# Counts non-background pixels of a canvas: a chart that drew its lines has thousands.
PAINTED_PIXELS_JS = """
(canvas) => {
  const { width, height } = canvas;
  const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
  return { width, height, painted };
}
"""


def _shot(page: Any, name: str) -> None:
    # A full-page picture has no viewport bottom for the sticky form buttons to stick to;
    # let them sit where they are in the document, after the last field.
    page.add_style_tag(content=".form-actions { position: static; }")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _other_experiments(now: datetime) -> None:
    """A few more experiments, so that the list page shows every kind of row."""
    base = {
        "variants": [
            services.VariantInput("v1", "http://127.0.0.1:9101", 0.5, is_control=True),
            services.VariantInput("v2", "http://127.0.0.1:9102", 0.5),
        ],
        "metrics": [services.MetricUseInput("latency-p95", "guardrail", 0.1)],
    }
    services.experiment_create(
        actor="ml-team", key="reranker-ab", name="Re-ranker A/B", kind="ab", **base
    )
    services.experiment_start(actor="ml-team", key="reranker-ab")
    services.experiment_create(
        actor="ml-team", key="embeddings-v3", name="Embeddings v3 canary", kind="canary", **base
    )
    services.experiment_create(
        actor="ml-team", key="spam-filter-v7", name="Spam filter v7", kind="canary", **base
    )
    services.experiment_start(actor="ml-team", key="spam-filter-v7")
    services.experiment_complete(actor="ml-team", key="spam-filter-v7", winner_key="v2")


def _feed(experiment: Experiment, start: datetime) -> int:
    """Traffic rows as the edge writes them, analysed by the real analysis service.

    v2 is about 6% slower than v1: inside the 10% margin, so the analysis keeps the canary
    running and the decision to roll back is the on-call engineer's. The analysis folds the
    rows it saw at one run into the next one, so the first run has no numbers yet.
    """
    ab_test = Experiment.objects.get(key="reranker-ab")
    for step in range(2):
        traffic(
            ab_test, control_n=400, canary_n=400, at=later(start, step), unit_prefix=f"ab{step}"
        )
        analysis_services.analysis_run(experiment_id=ab_test.pk, now=later(start, step + 1))
    # The p95 guardrail bets on users (per-user rows) against control's p95 in buckets that
    # closed before each user's first request: a first bucket sets it, and each look comes
    # once the users' fast windows have closed.
    traffic(
        experiment, control_n=600, canary_n=200, at=later(start, 1), unit_prefix="w", users=True
    )
    runs = 0
    for step in range(6):
        at = later(start, 20 * step + 21)
        traffic(
            experiment,
            control_n=600,
            canary_n=200,
            canary_slowdown=1.06,
            at=at,
            seed=10 + step,
            unit_prefix=f"r{step}",
            users=True,
        )
        result = analysis_services.analysis_run(experiment_id=experiment.pk, now=later(at, 15))
        runs += result is not None
    return runs


def test_create_start_watch_and_roll_back_a_canary(
    app_url: str, browser_page: Any, metrics: Any
) -> None:
    page = browser_page
    User.objects.create_user("oncall", password=PASSWORD)
    # New users are viewers; the on-call engineer creates and rolls back experiments.
    services.user_role_assign(actor="test", username="oncall", role="experimenter")
    _other_experiments(datetime.now())

    # 1. Log in.
    page.goto(f"{app_url}/experiments/new/")
    assert "/accounts/login/" in page.url
    page.get_by_label("Username").fill("oncall")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{app_url}/experiments/new/")

    # 2. Create the canary through the form; the second version's URL is wrong at first.
    page.get_by_label("Name", exact=True).fill("Ranker v2 canary")
    page.locator("#id_key").fill("ranker-v2")
    page.get_by_label("Hypothesis").fill(
        "v2's new tokenizer lifts conversion without slowing p95 latency by more than 10%"
    )
    page.fill("#id_variants-0-upstream_url", "http://127.0.0.1:9001")
    page.fill("#id_variants-1-upstream_url", "model-v2:9002")
    for metric, role, margin in (
        ("latency-p95", "guardrail", "10"),
        ("error-rate", "guardrail", "0"),
        ("conversion", "primary", None),
    ):
        page.get_by_role("button", name="Add a metric").click()
        row = page.locator("[data-metric-row]").last
        row.get_by_label("Metric", exact=True).select_option(metric)
        row.get_by_label("Role").select_option(role)
        if margin is not None:
            row.get_by_label("Tolerated harm (%)").fill(margin)
    first_metric = page.locator("[data-metric-row]").first
    assert first_metric.locator("[data-phrase]").inner_text() == (
        "p95 latency may rise at most 10%"
    )
    # A 25% -> 50% -> 100% ramp: remove the first three default steps.
    for _ in range(3):
        page.locator('[data-rows="ramp"] [data-row]:not([hidden])').first.get_by_role(
            "button", name="Remove this step"
        ).click()
    page.fill(
        '[data-rows="ramp"] [data-row]:not([hidden]) >> nth=0 >> [name$="min_duration_s"]', "600"
    )
    _shot(page, "form")
    page.get_by_role("button", name="Create draft").click()

    error = page.locator("#id_variants-1-upstream_url_error")
    error.wait_for()
    assert "Must be an http or https URL." in error.inner_text()
    assert page.locator("#id_variants-1-upstream_url").get_attribute("aria-invalid") == "true"
    assert Experiment.objects.filter(key="ranker-v2").count() == 0
    _shot(page, "form-error")
    page.fill("#id_variants-1-upstream_url", "http://127.0.0.1:9002")
    page.get_by_role("button", name="Create draft").click()
    page.wait_for_url(f"{app_url}/experiments/ranker-v2/")
    experiment = Experiment.objects.get(key="ranker-v2")
    assert [s.canary_share for s in experiment.ramp_steps.all()] == [0.25, 0.5, 1.0]
    assert [(m.metric.key, m.role, m.margin) for m in experiment.metrics.all()] == [
        ("latency-p95", "guardrail", 0.1),
        ("error-rate", "guardrail", 0.0),
        ("conversion", "primary", 0.0),
    ]

    _shot(page, "experiment-draft")

    # 3. Start it, through the confirmation dialog.
    page.get_by_role("link", name="Start…").click()
    dialog = page.locator("dialog#dialog-start")
    assert dialog.is_visible()
    dialog.get_by_role("button", name="Start").click()
    page.locator(".messages").get_by_text("Started.").wait_for()
    experiment.refresh_from_db()
    assert experiment.status == "running"

    # 4. Feed it: exposures and latency buckets, analysed by the analysis service.
    assert experiment.step_started_at is not None
    assert _feed(experiment, experiment.step_started_at) == 6

    # The list shows the latest decision of each experiment.
    page.goto(f"{app_url}/")
    page.locator("#decision-ranker-v2 .badge").wait_for()
    assert "Healthy" in page.locator("#decision-ranker-v2").inner_text()
    _shot(page, "list")

    # 5. The results table and the charts render.
    page.goto(f"{app_url}/experiments/ranker-v2/")
    table = page.locator("#results-table")
    table.wait_for()
    assert "p95 latency is" in table.inner_text() and "higher on v2" in table.inner_text()
    assert "Within margin" in table.inner_text()
    page.wait_for_function(
        "document.querySelector('#charts').getAttribute('data-chart-points') === '6'"
    )
    latency = page.locator("#latency-chart").evaluate(PAINTED_PIXELS_JS)
    assert latency["width"] > 300 and latency["height"] > 150 and latency["painted"] > 2000
    lift_canvas = page.locator('canvas[data-lift-chart="latency-p95:v2"]')
    lift = lift_canvas.evaluate(PAINTED_PIXELS_JS)
    assert lift["width"] > 300 and lift["painted"] > 2000
    _shot(page, "experiment")

    # 6. Roll it back with a reason.
    page.get_by_role("link", name="Roll back…").click()
    dialog = page.locator("dialog#dialog-rollback")
    dialog.get_by_label("Reason").fill(ROLLBACK_REASON)
    dialog.get_by_role("button", name="Roll back").click()
    page.locator(".messages").get_by_text("Rolled back.").wait_for()
    experiment.refresh_from_db()
    assert experiment.status == "rolled_back" and experiment.end_reason == ROLLBACK_REASON

    # 7. The audit log shows who did it and why.
    audit = page.locator("#audit")
    assert "Rolled back by oncall (experimenter)" in audit.inner_text()
    assert ROLLBACK_REASON in audit.inner_text()
    assert AuditEntry.objects.get(experiment=experiment, action="rollback").actor == "oncall"
    _shot(page, "experiment-rolled-back")

    # Settings: an experimenter may not manage webhooks or keys; as an admin, a webhook and
    # a test alert through htmx (CSRF header included), an API key shown once.
    page.goto(f"{app_url}/settings/")
    page.locator("#webhooks-card").get_by_text(
        "Only admins add, delete and test webhooks."
    ).wait_for()
    assert page.get_by_role("button", name="Create key").count() == 0
    services.user_role_assign(actor="test", username="oncall", role="admin")
    page.goto(f"{app_url}/settings/")
    card = page.locator("#webhooks-card")
    card.get_by_label("Name").fill("On-call pager")
    card.get_by_label("URL").fill("https://pager.example.com/rampart/secret-path")
    card.get_by_label("Secret").fill("too-short")
    card.get_by_role("button", name="Add webhook").click()
    page.locator("#id_webhook_secret_error").get_by_text("Use at least 16 characters.").wait_for()
    card = page.locator("#webhooks-card")
    card.get_by_label("Secret").fill("a-signing-secret-of-32-characters")
    card.get_by_role("button", name="Add webhook").click()
    card.get_by_text("Added webhook “On-call pager” (pager.example.com).").wait_for()
    card.get_by_role("button", name="Send test alert").click()
    card.get_by_text("Queued a test alert to 1 destination").wait_for()
    assert "secret-path" not in page.content()
    keys = page.locator("#api-keys")
    keys.get_by_label("Name").fill("checkout service")
    keys.get_by_label("Ingest (events)").check()
    keys.get_by_role("button", name="Create key").click()
    assert page.locator("#new-api-key").inner_text().startswith("rk_")
    _shot(page, "settings")
    page.goto(f"{app_url}/catalogue/")
    page.get_by_role("heading", name="Metric catalogue").wait_for()
    _shot(page, "metrics")

    # The same pages on a phone: one column, tables scroll sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{app_url}/experiments/ranker-v2/")
    page.locator("#results-table").wait_for()
    _shot(page, "experiment-phone")
    page.goto(f"{app_url}/")
    _shot(page, "list-phone")

    # The README's pictures are committed; refresh them only when asked, so that a test run
    # does not leave tracked files changed.
    if os.environ.get("RAMPART_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("list", "form", "experiment"):
            shutil.copyfile(SCREENSHOTS / f"{name}.png", DOCS_SCREENSHOTS / f"{name}.png")
