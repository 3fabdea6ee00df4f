"""UI: start a canary from a shadow (the button on the experiment page's shadow verdicts)."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from experiments import roles, services
from experiments.errors import InvalidInput, NotFound


@roles.role_required(roles.CREATE_EXPERIMENTS)
@require_POST
def shadow_canary(request: HttpRequest, key: str, shadow: str) -> HttpResponse:
    """Create the shadow's draft canary (once) and open it; a second click opens the same one."""
    actor = request.user.get_username() or "web"
    try:
        result = services.canary_from_shadow(actor=actor, key=key, shadow_key=shadow)
    except NotFound as exc:
        raise Http404(str(exc)) from None
    except InvalidInput as exc:
        for errors in exc.errors.values():
            for error in errors:
                messages.error(request, f"Could not start a canary: {error}")
        return redirect("experiments:detail", key=key)
    canary = result.experiment.key
    if result.created:
        messages.success(
            request,
            f"Created the draft canary {canary!r} from shadow {shadow!r}: point traffic at "
            f"/proxy/{canary}/ and start it.",
        )
    else:
        messages.info(request, f"Shadow {shadow!r} already has its canary {canary!r}.")
    return redirect("experiments:detail", key=canary)
