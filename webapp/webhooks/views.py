"""The webhook section of the account page: the endpoint, its secret, a test event, deliveries."""

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from webapp.accounts.views import render_account
from webapp.webhooks.forms import EndpointForm
from webapp.webhooks.models import Delivery, Endpoint

QUEUE_DOWN = "The queue is unreachable; it will be sent once the queue is back."


def _get_endpoint_for_user(request: HttpRequest) -> Endpoint:
    return get_object_or_404(Endpoint, owner=request.user)


def _get_delivery_for_user(request: HttpRequest, delivery_id: int) -> Delivery:
    return get_object_or_404(Delivery.objects.select_related("endpoint", "job"), id=delivery_id,
                             endpoint__owner=request.user)


@never_cache
@require_POST
def save_endpoint(request: HttpRequest) -> HttpResponse:
    """Set the endpoint's URL; a new endpoint's secret is shown in this response only."""
    endpoint = Endpoint.objects.filter(owner=request.user).first()
    form = EndpointForm(request.POST, instance=endpoint or Endpoint(owner=request.user))
    if not form.is_valid():
        return render_account(request, webhook_form=form, status=400)
    form.save()
    if endpoint is None:
        return render_account(request, webhook_secret=form.instance.secret)
    messages.success(request, f"Events now go to {form.instance.url}.")
    return redirect("account")


@never_cache
@require_POST
def regenerate_secret(request: HttpRequest) -> HttpResponse:
    """A new secret (the old one stops signing at once), shown in this response only."""
    return render_account(request, webhook_secret=_get_endpoint_for_user(request).regenerate_secret())


@require_POST
def remove_endpoint(request: HttpRequest) -> HttpResponse:
    _get_endpoint_for_user(request).delete()
    messages.success(request, "Your webhook is removed: no more events will be sent.")
    return redirect("account")


@require_POST
def send_test_event(request: HttpRequest) -> HttpResponse:
    delivery = Delivery.test_event(_get_endpoint_for_user(request))
    sent = delivery.send()
    messages.success(request, "A test event is on its way; its outcome appears below." if sent else QUEUE_DOWN)
    return redirect("account")


@never_cache
def delivery(request: HttpRequest, delivery_id: int) -> HttpResponse:
    """One delivery: the body sent, and every try's answer."""
    delivery = _get_delivery_for_user(request, delivery_id)
    return render(request, "webhooks/delivery.html", {"delivery": delivery, "attempts": delivery.attempts.all()})


@require_POST
def retry_delivery(request: HttpRequest, delivery_id: int) -> HttpResponse:
    delivery = _get_delivery_for_user(request, delivery_id)
    if delivery.try_again():
        messages.success(request, f"The event {delivery.event_id} is being sent again.")
    return redirect("webhook_delivery", delivery_id=delivery.id)
