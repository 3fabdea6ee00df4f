"""Shadow pair claims become one per experiment, shadow and user (``routing.observe.pair_claims``).

A claim written before covered all of its experiment's shadows: it becomes one claim per shadow
variant of the experiment, so each user keeps exactly the pairs it had. The new unique
constraint is added by the next migration, in its own transaction (PostgreSQL refuses to alter
a table with rows inserted earlier in the same transaction while its foreign key checks wait
for the commit).
"""

from django.db import migrations, models


def claims_per_shadow(apps, schema_editor):
    claim_model = apps.get_model("routing", "ShadowPairClaim")
    variant_model = apps.get_model("experiments", "Variant")
    old = claim_model.objects.filter(variant_key="")
    experiment_ids = set(old.values_list("experiment_id", flat=True).distinct())
    shadows: dict[int, list[str]] = {}
    for experiment_id, key in variant_model.objects.filter(
        experiment_id__in=experiment_ids, is_shadow=True
    ).values_list("experiment_id", "key"):
        shadows.setdefault(experiment_id, []).append(key)
    for experiment_id in experiment_ids:
        keys = shadows.get(experiment_id, [])
        rows = old.filter(experiment_id=experiment_id).values_list("unit_id", "claimed_at")
        claim_model.objects.bulk_create(
            (
                claim_model(
                    experiment_id=experiment_id, variant_key=key, unit_id=unit, claimed_at=at
                )
                for unit, at in rows.iterator()
                for key in keys
            ),
            batch_size=1000,
        )
    old.delete()


def claims_per_user(apps, schema_editor):
    claim_model = apps.get_model("routing", "ShadowPairClaim")
    kept: set[tuple[int, str]] = set()
    duplicates = []
    for claim_id, experiment_id, unit in claim_model.objects.order_by("claimed_at", "id").values_list(
        "id", "experiment_id", "unit_id"
    ):
        if (experiment_id, unit) in kept:
            duplicates.append(claim_id)
        else:
            kept.add((experiment_id, unit))
    for start in range(0, len(duplicates), 1000):
        claim_model.objects.filter(id__in=duplicates[start : start + 1000]).delete()
    claim_model.objects.update(variant_key="")


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0008_drift_settings"),
        ("routing", "0011_input_claims"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="shadowpairclaim",
            name="shadow_pair_claim_once",
        ),
        migrations.AddField(
            model_name="shadowpairclaim",
            name="variant_key",
            field=models.CharField(default="", max_length=64),
            preserve_default=False,
        ),
        migrations.RunPython(claims_per_shadow, claims_per_user),
    ]
