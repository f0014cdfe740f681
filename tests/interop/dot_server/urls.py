"""DOT's endpoints under /o/, RFC 8414 metadata, a login page, one protected
resource, and one operator action (revoke a user's grants)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponseNotAllowed, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider import urls as dot_urls
from oauth2_provider.models import get_refresh_token_model
from oauth2_provider.views.generic import ProtectedResourceView

__all__ = ["urlpatterns"]


class Whoami(ProtectedResourceView):
    """200 with the token's user for a valid bearer access token, 403 otherwise."""

    def get(self, request: HttpRequest, *args: object, **kwargs: object) -> JsonResponse:
        return JsonResponse({"user": request.resource_owner.get_username()})  # type: ignore[attr-defined]


@csrf_exempt
def revoke_grants(request: HttpRequest, username: str) -> JsonResponse | HttpResponseNotAllowed:
    """What an administrator (or the user, in a provider's UI) does behind the
    client's back: DOT's own ``RefreshToken.revoke`` on every live grant."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    live = get_refresh_token_model().objects.filter(user__username=username, revoked__isnull=True)
    count = 0
    for token in live:
        token.revoke()
        count += 1
    return JsonResponse({"revoked": count})


urlpatterns = [
    path("o/", include((dot_urls.base_urlpatterns, "oauth2_provider"))),
    path("", include((dot_urls.metadata_urlpatterns, "oauth2_provider_metadata"))),
    path("accounts/login/", auth_views.LoginView.as_view(template_name="interop/login.html"), name="login"),
    path("api/whoami", Whoami.as_view(), name="whoami"),
    path("interop/revoke-grants/<str:username>", revoke_grants, name="revoke-grants"),
]
