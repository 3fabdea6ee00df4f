"""Django admin of webhooks: names, hosts and the enabled flag; never the URL or the secret."""

from urllib.parse import urlsplit

from django.contrib import admin
from django.http import HttpRequest

from analysis.models import WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ("name", "host", "enabled", "created_at")
    list_filter = ("enabled",)
    # URLs and secrets are secrets: webhooks are added on the Settings page or through the API.
    fields = ("name", "host", "enabled", "created_at")
    readonly_fields = ("host", "created_at")

    @admin.display(description="host")
    def host(self, endpoint: WebhookEndpoint) -> str:
        return urlsplit(endpoint.url).hostname or "?"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
