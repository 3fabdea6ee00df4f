"""Roles: viewer, experimenter and admin, as Django groups holding Django permissions.

- *viewer* reads everything (experiments, metrics, results, audit log, key and webhook
  lists, never a secret);
- *experimenter* also creates and edits experiments and metrics and runs them (start,
  pause, resume, advance, roll back, complete: the custom `experiments.run_experiment`);
- *admin* also manages API keys (with the manage scope: `experiments.grant_manage_scope`),
  webhooks and users.

A user's role is the highest of the role groups they belong to; a superuser is an admin.
New users join the viewer group (`user_created`). Every check is a plain Django permission
(`user.has_perm`), so the UI, the session-authenticated API and the Django admin agree, and
an admin may fine-tune a group in the Django admin.

API keys are not users: a key acts with the role its scopes imply (`key_role`): `manage`
is the admin role (it may manage keys and webhooks), `read` the viewer role.

The groups are created by the data migration `0003_roles` and, when missing (a test
database flushed between tests, a group deleted by hand), again by `ensure_role_groups`
after every `migrate` and before a role is given to a user. An existing group is never
changed here, so an admin's edits in the Django admin survive deploys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required, permission_required
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType

from experiments.models import ApiKey, ApiScope

VIEWER: Final = "viewer"
EXPERIMENTER: Final = "experimenter"
ADMIN: Final = "admin"
ROLES: Final = (VIEWER, EXPERIMENTER, ADMIN)  # lowest first
# Recorded in the audit log for actors that are neither a user nor a key: the analysis
# worker, management commands.
SYSTEM: Final = "system"
NO_ROLE: Final = "none"

# The permissions the views check, by name.
READ: Final = "experiments.view_experiment"
EDIT_EXPERIMENTS: Final = "experiments.change_experiment"
CREATE_EXPERIMENTS: Final = "experiments.add_experiment"
RUN_EXPERIMENTS: Final = "experiments.run_experiment"
CREATE_METRICS: Final = "experiments.add_metric"
EDIT_METRICS: Final = "experiments.change_metric"
CREATE_KEYS: Final = "experiments.add_apikey"
REVOKE_KEYS: Final = "experiments.change_apikey"
GRANT_MANAGE_SCOPE: Final = "experiments.grant_manage_scope"

# Permissions that no model's Meta declares: (app label, model, codename, name). They are
# created with the groups (Django only creates the four default permissions per model).
CUSTOM_PERMISSIONS: Final = (
    (
        "experiments",
        "experiment",
        "run_experiment",
        "Can start, pause, resume, advance, roll back and complete experiments",
    ),
    ("experiments", "apikey", "grant_manage_scope", "Can create API keys with the manage scope"),
)


def _crud(app: str, model: str, *actions: str) -> list[str]:
    return [f"{app}.{action}_{model}" for action in actions]


_READ_MODELS = (
    ("experiments", "experiment"),
    ("experiments", "variant"),
    ("experiments", "metric"),
    ("experiments", "experimentmetric"),
    ("experiments", "rampstep"),
    ("experiments", "auditentry"),
    ("experiments", "apikey"),
    ("analysis", "resultsnapshot"),
    ("analysis", "alertoutbox"),
    ("analysis", "webhookendpoint"),
)
_EXPERIMENT_MODELS = (
    ("experiments", "experiment"),
    ("experiments", "variant"),
    ("experiments", "experimentmetric"),
    ("experiments", "rampstep"),
    ("experiments", "metric"),
)

_VIEWER_PERMS = [perm for app, model in _READ_MODELS for perm in _crud(app, model, "view")]
_EXPERIMENTER_PERMS = [
    *_VIEWER_PERMS,
    *(
        perm
        for app, model in _EXPERIMENT_MODELS
        for perm in _crud(app, model, "add", "change", "delete")
    ),
    RUN_EXPERIMENTS,
]
_ADMIN_PERMS = [
    *_EXPERIMENTER_PERMS,
    *_crud("experiments", "apikey", "add", "change", "delete"),
    GRANT_MANAGE_SCOPE,
    *_crud("analysis", "webhookendpoint", "add", "change", "delete"),
    *_crud("auth", "user", "view", "add", "change", "delete"),
    "auth.view_group",
]
ROLE_PERMISSIONS: Final[dict[str, tuple[str, ...]]] = {
    VIEWER: tuple(_VIEWER_PERMS),
    EXPERIMENTER: tuple(_EXPERIMENTER_PERMS),
    ADMIN: tuple(_ADMIN_PERMS),
}
ROLE_SUMMARIES: Final = {
    VIEWER: "reads experiments, results, metrics and the audit log",
    EXPERIMENTER: "also creates, edits and runs experiments and metrics",
    ADMIN: "also manages API keys, webhooks and users",
}


def sync_role_groups(
    *,
    group_model: Any,
    permission_model: Any,
    content_type_model: Any,
    only_missing: bool,
) -> None:
    """Create the role groups with their permissions; idempotent.

    Takes the model classes so that the data migration can pass its historical models. With
    ``only_missing`` an existing group is left as it is; otherwise the permissions a role
    lacks are added (never removed).
    """
    for app_label, model, codename, name in CUSTOM_PERMISSIONS:
        content_type, _ = content_type_model.objects.get_or_create(app_label=app_label, model=model)
        permission_model.objects.get_or_create(
            content_type=content_type, codename=codename, defaults={"name": name}
        )
    for role, perms in ROLE_PERMISSIONS.items():
        group, created = group_model.objects.get_or_create(name=role)
        if only_missing and not created:
            continue
        group.permissions.add(*_permissions(permission_model, content_type_model, perms))


def _permissions(permission_model: Any, content_type_model: Any, perms: Iterable[str]) -> list[Any]:
    """Permission rows for "app.codename" names, creating any the post-migrate step has not
    created yet (a data migration runs before Django creates the default permissions)."""
    found = []
    for perm in perms:
        app_label, codename = perm.split(".", 1)
        model = codename.split("_", 1)[1]
        content_type, _ = content_type_model.objects.get_or_create(app_label=app_label, model=model)
        action = codename.split("_", 1)[0]
        permission, _ = permission_model.objects.get_or_create(
            content_type=content_type,
            codename=codename,
            defaults={"name": f"Can {action} {model}"},
        )
        found.append(permission)
    return found


def ensure_role_groups() -> None:
    """Create any missing role group (with its permissions); existing groups stay as they are."""
    if Group.objects.filter(name__in=ROLES).count() == len(ROLES):
        return
    sync_role_groups(
        group_model=Group,
        permission_model=Permission,
        content_type_model=ContentType,
        only_missing=True,
    )


def role_of(user: Any) -> str:
    """The role of a user: the highest role group they are in; superusers are admins."""
    if user is None or not getattr(user, "is_authenticated", False):
        return NO_ROLE
    if getattr(user, "is_superuser", False):
        return ADMIN
    if not hasattr(user, "groups"):
        # An API key's principal (DRF sets it as request.user): its role comes from scopes.
        return str(getattr(user, "role", NO_ROLE))
    names = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
    for role in reversed(ROLES):
        if role in names:
            return role
    return NO_ROLE


def key_role(scopes: Iterable[str]) -> str:
    """The role an API key acts with: manage keys are admins, read keys viewers."""
    granted = set(scopes)
    if ApiScope.MANAGE in granted:
        return ADMIN
    if ApiScope.READ in granted:
        return VIEWER
    return NO_ROLE


def role_of_actor(actor: str) -> str:
    """The role to record in the audit log for an actor string of the interfaces.

    Actors are ``user:<username>`` (API sessions), ``<username>`` (the web UI; usernames
    cannot hold a colon), ``apikey:<prefix>:<name>`` (API keys), or a name with a colon
    for automatic actors (``rampart:analysis``, ``cli:createapikey``), which are the system.
    """
    kind, sep, rest = actor.partition(":")
    if sep and kind == "apikey":
        prefix = rest.split(":", 1)[0]
        scopes = ApiKey.objects.filter(prefix=prefix).values_list("scopes", flat=True).first()
        return key_role(scopes) if scopes is not None else SYSTEM
    if sep and kind != "user":
        return SYSTEM
    username = rest if sep else actor
    user = get_user_model().objects.filter(username=username).first()
    return role_of(user) if user is not None else SYSTEM


def user_created(sender: Any, instance: Any, created: bool, raw: bool = False, **_: Any) -> None:
    """post_save of the user model: a new user is a viewer (a new superuser is an admin)."""
    if not created or raw or instance.is_superuser:
        return
    ensure_role_groups()
    instance.groups.add(Group.objects.get(name=VIEWER))


def groups_after_migrate(**_: Any) -> None:
    """post_migrate: recreate missing role groups (a flushed test database, a deleted group)."""
    ensure_role_groups()


def role_context(request: Any) -> dict[str, str]:
    """Template context processor: the signed-in user's role, shown in the top bar."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"rampart_role": role_of(user)}


def role_required(perm: str) -> Any:
    """View decorator: log in first (redirect), then hold `perm` (else 403)."""

    def decorate(view: Any) -> Any:
        return login_required(permission_required(perm, raise_exception=True)(view))

    return decorate
