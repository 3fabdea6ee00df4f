"""URL routes of the management API, mounted at /api/v1/."""

from rest_framework.routers import SimpleRouter

from experiments.api.views import ApiKeyViewSet, ExperimentViewSet, MetricViewSet

router = SimpleRouter(trailing_slash="/?")
router.register("experiments", ExperimentViewSet, basename="experiment")
router.register("metrics", MetricViewSet, basename="metric")
router.register("api-keys", ApiKeyViewSet, basename="apikey")

urlpatterns = router.urls
