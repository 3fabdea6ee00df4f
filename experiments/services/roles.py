"""Roles of users: give a user the viewer, experimenter or admin role, audited."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction

from experiments.errors import InvalidInput, NotFound
from experiments.roles import ADMIN, ROLES, ensure_role_groups, role_of
from experiments.services.common import audit


@dataclass(frozen=True)
class RoleChange:
    username: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def user_role_assign(*, actor: str, username: str, role: str) -> RoleChange:
    """Put a user in exactly one role group.

    Admins are staff (they may use the Django admin); the other roles are not. Giving a
    superuser a lower role takes the superuser flag away, since a superuser passes every
    permission check whatever their groups say.
    """
    if role not in ROLES:
        raise InvalidInput({"role": [f"Must be one of {', '.join(ROLES)}."]})
    ensure_role_groups()
    with transaction.atomic():
        user = get_user_model().objects.select_for_update().filter(username=username).first()
        if user is None:
            raise NotFound("user", username)
        before = role_of(user)
        user.groups.remove(*Group.objects.filter(name__in=ROLES).exclude(name=role))
        user.groups.add(Group.objects.get(name=role))
        user.is_staff = role == ADMIN
        if role != ADMIN:
            user.is_superuser = False
        user.save(update_fields=["is_staff", "is_superuser"])
        if before != role:
            audit(
                experiment=None,
                actor=actor,
                action="user.role",
                before={"user": username, "role": before},
                after={"user": username, "role": role},
            )
    return RoleChange(username=username, before=before, after=role)
