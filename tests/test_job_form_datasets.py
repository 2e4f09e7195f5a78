"""The new-job form offers only datasets that are ready to train on."""

import pytest

from tests.test_job_new import VALID
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job

pytestmark = pytest.mark.django_db


def dataset_in(owner, status: str) -> Dataset:
    return Dataset.objects.create(owner=owner, name=f"d-{status}", original_name="d.jsonl", format="jsonl",
                                  rows_total=10, rows_ok=10, status=status)


@pytest.mark.parametrize("status", ["uploaded", "parsing", "review", "rejected"])
def test_a_dataset_that_is_not_ready_is_neither_offered_nor_accepted(owner_client, owner, train_queue, status):
    ready, waiting = dataset_in(owner, "ready"), dataset_in(owner, status)
    page = owner_client.get("/jobs/new/").content.decode()
    assert f'<option value="{ready.id}"' in page and f'<option value="{waiting.id}"' not in page
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": waiting.id})
    assert reply.status_code == 200 and "dataset" in reply.context["form"].errors
    assert not Job.objects.exists() and not train_queue()


def test_the_ready_dataset_is_accepted(owner_client, owner, train_queue):
    reply = owner_client.post("/jobs/new/", {**VALID, "dataset": dataset_in(owner, "ready").id})
    assert reply.status_code == 302 and Job.objects.count() == 1


def test_sample_data_lands_on_the_job_form_with_the_sample_chosen(owner_client, media_root, settings):
    settings.INLINE_PARSE_BYTES = 0  # larger uploads go to the worker; the sample is still read at once
    reply = owner_client.post("/datasets/samples/sft/")
    dataset = Dataset.objects.get()
    assert dataset.status == "ready" and reply.url == f"/jobs/new/?dataset={dataset.id}"
    page = owner_client.get(reply.url).content.decode()
    assert f'<option value="{dataset.id}" selected>' in page


@pytest.mark.parametrize("status", ["uploaded", "parsing", "review", "rejected"])
def test_the_train_link_of_a_dataset_that_is_not_ready_leads_back_to_it_with_the_reason(owner_client, owner, status):
    waiting = dataset_in(owner, status)
    reply = owner_client.get(f"/jobs/new/?dataset={waiting.id}", follow=True)
    assert reply.redirect_chain == [(f"/datasets/{waiting.id}/", 302)]
    assert "it can be trained on once it is ready" in reply.content.decode()


@pytest.mark.parametrize("value", ["abc", "-1", "99999", ""])
def test_a_train_link_naming_no_dataset_of_yours_shows_the_plain_form(owner_client, value):
    assert owner_client.get(f"/jobs/new/?dataset={value}").status_code == 200
