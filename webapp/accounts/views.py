from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.views import LoginView
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from webapp.accounts import ratelimit


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
