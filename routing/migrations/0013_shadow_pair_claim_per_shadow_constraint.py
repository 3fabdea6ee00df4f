from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0012_shadow_pair_claims_per_shadow"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="shadowpairclaim",
            constraint=models.UniqueConstraint(
                fields=("experiment", "variant_key", "unit_id"), name="shadow_pair_claim_per_shadow"
            ),
        ),
    ]
