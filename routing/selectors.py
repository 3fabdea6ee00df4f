"""Selectors of the routing app: read-only queries over the exposures the edge records."""

from __future__ import annotations

from django.db import connection
from django.db.models import Count

from routing.models import Exposure


def multiple_exposure_counts(experiment_id: int) -> tuple[int, int]:
    """(units exposed, units exposed to more than one variant) of one experiment.

    A unit has one Exposure row per variant it was served, so a unit with several rows saw
    several variants (for example after a weight change) and analysis should leave it out.
    """
    table = connection.ops.quote_name(Exposure._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN variants > 1 THEN 1 ELSE 0 END), 0) "
            f"FROM (SELECT unit_id, COUNT(*) AS variants FROM {table} "
            "WHERE experiment_id = %s GROUP BY unit_id) AS per_unit",
            [experiment_id],
        )
        total, several = cursor.fetchone()
    return int(total), int(several)


def exposure_counts(
    experiment_id: int, *, exclude_multiple_variants: bool = False
) -> dict[str, int]:
    """Units exposed per variant key of one experiment.

    A unit that saw two variants counts in both, unless ``exclude_multiple_variants``.
    """
    rows = Exposure.objects.filter(experiment_id=experiment_id)
    if exclude_multiple_variants:
        several = (
            Exposure.objects.filter(experiment_id=experiment_id)
            .values("unit_id")
            .annotate(variants=Count("id"))
            .filter(variants__gt=1)
            .values("unit_id")
        )
        rows = rows.exclude(unit_id__in=several)
    counts = rows.values("variant_key").annotate(units=Count("id")).order_by("variant_key")
    return {row["variant_key"]: int(row["units"]) for row in counts}
