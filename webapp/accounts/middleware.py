from django.contrib.auth import get_user_model
from django.shortcuts import redirect
from django.urls import reverse


class FirstRunMiddleware:
    """Until an account exists, every page leads to the form that creates the admin."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.has_users = False

    def __call__(self, request):
        if not self.has_users:
            self.has_users = get_user_model().objects.exists()
            setup = reverse("setup")
            static = request.path.startswith("/static/")
            if not self.has_users and request.path != setup and not static:
                return redirect(setup)
        return self.get_response(request)
