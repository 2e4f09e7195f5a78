from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.views import LoginView
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from webapp.accounts import ratelimit
from webapp.accounts.models import ApiKey
from webapp.webhooks.forms import EndpointForm
from webapp.webhooks.models import Endpoint


class AdminCreationForm(UserCreationForm):
    class Meta(UserCreationForm.Meta):
        model = get_user_model()
        fields = ("username", "email")


@login_not_required
def setup(request: HttpRequest) -> HttpResponse:
    """First run: create the administrator. Gone for good once any account exists."""
    if get_user_model().objects.exists():
        return redirect("home")
    form = AdminCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save(commit=False)
        user.is_staff = user.is_superuser = True
        user.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "accounts/setup.html", {"form": form})


class RateLimitedLoginView(LoginView):
    """Sign-in that refuses a name (or a busy address) after repeated failures, for a while."""

    def post(self, request, *args, **kwargs):
        attempt = ratelimit.start_attempt(request, request.POST.get("username", ""))
        if attempt.refused:
            minutes = settings.LOGIN_FAILURE_WINDOW_SECONDS // 60
            message = f"Too many failed sign-in attempts. Wait {minutes} minutes, then try again."
            context = self.get_context_data(form=self.form_class(request), locked_out=message)
            return self.render_to_response(context, status=429)
        response = super().post(request, *args, **kwargs)
        attempt.finish(failed=response.status_code == 200)  # the form came back: a wrong name or password
        return response


MAX_LIVE_KEYS = 20
"""API keys one person may hold at once (revoked ones do not count)."""


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, label="What the key is for",
                           help_text="A name to tell your keys apart, such as a script or a server.")


@never_cache
@require_http_methods(["GET", "POST"])
def account(request: HttpRequest) -> HttpResponse:
    """The user's API keys: made here (shown once, in this response only), listed with their last use;
    and their webhook (webapp/webhooks posts its forms)."""
    form = ApiKeyForm(request.POST or None)
    secret = None
    if request.method == "POST" and form.is_valid():
        if request.user.api_keys.filter(revoked_at__isnull=True).count() >= MAX_LIVE_KEYS:
            form.add_error(None, f"You have {MAX_LIVE_KEYS} live keys, the most one person may hold; revoke one first.")
        else:
            _, secret = ApiKey.issue(request.user, form.cleaned_data["name"])
            form = ApiKeyForm()
    return render_account(request, key_form=form, secret=secret, status=400 if form.errors else 200)


def render_account(
    request: HttpRequest, *, key_form: ApiKeyForm | None = None, secret: str | None = None,
    webhook_form: EndpointForm | None = None, webhook_secret: str | None = None, status: int = 200,
) -> HttpResponse:
    """The account page; `secret` and `webhook_secret` are shown in full in this response only."""
    endpoint = Endpoint.objects.filter(owner=request.user).first()
    context = {
        "form": key_form or ApiKeyForm(), "keys": request.user.api_keys.all(), "secret": secret, "api_base": "/v1",
        "webhook": endpoint, "webhook_form": webhook_form or EndpointForm(instance=endpoint),
        "webhook_secret": webhook_secret, "deliveries": endpoint.recent_deliveries() if endpoint else [],
    }
    return render(request, "accounts/account.html", context, status=status)


@require_POST
def revoke_key(request: HttpRequest, key_id: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, id=key_id, owner=request.user)
    if key.revoke():
        messages.success(request, f"The key {key.name} ({key.prefix}…) no longer works.")
    return redirect("account")
