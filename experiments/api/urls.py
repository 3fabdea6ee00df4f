"""URL routes of the management API, mounted at /api/v1/."""

from rest_framework.routers import SimpleRouter

from experiments.api.views import ApiKeyViewSet, ExperimentViewSet, MetricViewSet

# The trailing slash is optional on every route (both forms answer, for every method, with no
# redirect): SimpleRouter only knows "/" or "", so its pattern fragment is set afterwards.
router = SimpleRouter()
router.trailing_slash = "/?"
router.register("experiments", ExperimentViewSet, basename="experiment")
router.register("metrics", MetricViewSet, basename="metric")
router.register("api-keys", ApiKeyViewSet, basename="apikey")

urlpatterns = router.urls
