"""Personal API keys: made on the account page or by `manage.py apikey`, shown once, stored as a
digest, revocable; and the /v1/models API they open, in OpenAI's shapes."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from webapp.accounts.models import ApiKey
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db


def make_job(owner, state="succeeded", base="smollm2-135m-instruct") -> Job:
    dataset = Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl")
    return Job.objects.create(owner=owner, dataset=dataset, name="j", state=state, finished_at=timezone.now(),
                              spec={"base_model": base, "method": "lora", "task": "sft"})


def api(secret: str | None) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}") if secret else Client()


def test_a_key_is_kept_only_as_a_digest_and_signs_its_owner_in(owner):
    key, secret = ApiKey.issue(owner, "laptop")
    assert secret.startswith("sk-spec-") and len(secret) > 40
    stored = ApiKey.objects.get(id=key.id)
    assert secret not in (stored.digest, stored.prefix) and secret.startswith(stored.prefix)
    assert ApiKey.authenticate(secret).owner == owner
    assert ApiKey.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None


def test_a_revoked_key_or_a_disabled_user_no_longer_signs_in(owner):
    key, secret = ApiKey.issue(owner, "laptop")
    assert key.revoke() and not key.revoke()
    assert ApiKey.authenticate(secret) is None
    _, other_secret = ApiKey.issue(owner, "server")
    owner.is_active = False
    owner.save()
    assert ApiKey.authenticate(other_secret) is None


def test_the_last_use_is_recorded_at_most_once_a_minute(owner):
    key, secret = ApiKey.issue(owner, "laptop")
    ApiKey.authenticate(secret)
    first = ApiKey.objects.get(id=key.id).last_used_at
    assert first is not None
    ApiKey.authenticate(secret)
    assert ApiKey.objects.get(id=key.id).last_used_at == first
    ApiKey.objects.filter(id=key.id).update(last_used_at=first - timedelta(minutes=2))
    ApiKey.authenticate(secret)
    assert ApiKey.objects.get(id=key.id).last_used_at > first


def test_the_account_page_shows_a_new_key_once_then_only_its_prefix(owner_client, owner):
    page = owner_client.post("/account/", {"name": "nightly script"})
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    secret = page.context["secret"]
    assert secret in page.content.decode() and ApiKey.authenticate(secret).owner == owner
    again = owner_client.get("/account/").content.decode()
    assert secret not in again and "nightly script" in again and secret[:12] in again


def test_a_user_revokes_their_own_key_and_not_another_users(owner_client, other_client, owner):
    key, secret = ApiKey.issue(owner, "laptop")
    assert other_client.post(f"/account/keys/{key.id}/revoke/").status_code == 404
    assert ApiKey.authenticate(secret) is not None
    assert owner_client.post(f"/account/keys/{key.id}/revoke/").status_code == 302
    assert ApiKey.authenticate(secret) is None
    assert "revoked" in owner_client.get("/account/").content.decode()


def test_the_account_page_needs_a_sign_in(anon_client):
    assert anon_client.get("/account/").status_code == 302


def test_the_command_prints_a_key_for_a_user_and_refuses_an_unknown_one(owner):
    out = StringIO()
    call_command("apikey", "alice", "--name", "ops", stdout=out)
    key = ApiKey.authenticate(out.getvalue().strip())
    assert key.owner == owner and key.name == "ops"
    with pytest.raises(CommandError, match="No active user named 'nobody'"):
        call_command("apikey", "nobody")
    call_command("apikey", "alice", "--name", "x" * 500, stdout=out)
    assert ApiKey.objects.filter(owner=owner, name="x" * 100).exists()


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer sk-spec-not-a-key", "Basic YWxpY2U6cHc="])
def test_the_api_answers_401_in_openais_shape_without_a_live_key(owner, header):
    client = Client(HTTP_AUTHORIZATION=header) if header else Client()
    reply = client.get("/v1/models")
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_models_lists_the_bases_and_only_the_users_own_succeeded_jobs(owner, other_user):
    mine = make_job(owner)
    make_job(owner, state="training")
    theirs = make_job(other_user)
    _, secret = ApiKey.issue(owner, "laptop")
    listing = api(secret).get("/v1/models").json()
    names = [m["id"] for m in listing["data"]]
    assert listing["object"] == "list" and {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(names)
    assert f"ft:smollm2-135m-instruct:alice:{mine.id}" in names
    assert not [n for n in names if n.endswith(f":{theirs.id}") or ":bob:" in n]
    assert len([n for n in names if n.startswith("ft:")]) == 1


def test_another_users_model_or_a_wrong_name_is_not_found(owner, other_user):
    mine, theirs = make_job(owner), make_job(other_user)
    _, secret = ApiKey.issue(owner, "laptop")
    client = api(secret)
    found = client.get(f"/v1/models/ft:smollm2-135m-instruct:alice:{mine.id}")
    assert found.status_code == 200 and found.json()["owned_by"] == "alice"
    for name in (f"ft:smollm2-135m-instruct:bob:{theirs.id}", f"ft:smollm2-135m-instruct:alice:{theirs.id}",
                 f"ft:other-base:alice:{mine.id}", "ft:x", "gpt-4o"):
        reply = client.get(f"/v1/models/{name}")
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", name


def test_a_model_built_on_another_job_or_a_folder_is_named_by_its_base(owner):
    on_job = make_job(owner, base="job:7")
    on_folder = make_job(owner, base="/srv/models/my-llama")
    _, secret = ApiKey.issue(owner, "laptop")
    names = [m["id"] for m in api(secret).get("/v1/models").json()["data"]]
    assert f"ft:job-7:alice:{on_job.id}" in names and f"ft:my-llama:alice:{on_folder.id}" in names
