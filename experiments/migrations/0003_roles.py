"""Data migration: the viewer, experimenter and admin groups, and a role for existing users.

Idempotent: groups and permissions are created when missing and a role's permissions are
added, never removed. Existing users keep the access they had as far as it was deliberate:
superusers are admins through `is_superuser`, staff users (who could use the Django admin)
join the admin group, everyone else the viewer group. A user already in a role group is
left alone. Reversing removes nothing: the groups may have been edited since.
"""

from typing import Any

from django.db import migrations

from experiments.roles import ADMIN, ROLES, VIEWER, sync_role_groups


def create_roles(apps: Any, schema_editor: Any) -> None:
    group_model = apps.get_model("auth", "Group")
    sync_role_groups(
        group_model=group_model,
        permission_model=apps.get_model("auth", "Permission"),
        content_type_model=apps.get_model("contenttypes", "ContentType"),
        only_missing=False,
    )
    groups = {group.name: group for group in group_model.objects.filter(name__in=ROLES)}
    user_model = apps.get_model("auth", "User")
    for user in user_model.objects.filter(is_superuser=False).exclude(groups__name__in=ROLES):
        user.groups.add(groups[ADMIN] if user.is_staff else groups[VIEWER])


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("experiments", "0002_auditentry_actor_role"),
    ]

    operations = [migrations.RunPython(create_roles, migrations.RunPython.noop)]
