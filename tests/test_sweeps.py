"""Sweeps and side-by-side comparisons: the new-job form queues one job per combination of the
swept values in one group; the group page and the compare page show the runs' curves, the
settings that differ and the metrics reached, the best marked; cancelling a sweep ends its runs."""

import pytest

from tests.test_job_new import VALID
from webapp.datasets.models import Dataset
from webapp.jobs.models import Job, JobGroup
from worker.events import make_event
from worker.families import FAMILIES

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(owner):
    return Dataset.objects.create(owner=owner, name="rewrites", original_name="d.jsonl", format="jsonl",
                                  rows_total=10, rows_ok=10, status="ready")


def sweep(client, dataset, **fields):
    return client.post("/jobs/new/", {**VALID, "dataset": dataset.id, **fields})


def test_a_sweep_queues_one_job_per_combination_in_one_group(owner_client, dataset, train_queue,
                                                              django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        reply = sweep(owner_client, dataset, sweep_learning_rate="1e-3, 2e-3", sweep_lora_r="4,8")
    group = JobGroup.objects.get()
    assert reply.status_code == 302 and reply.url == f"/jobs/groups/{group.id}/"
    runs = list(group.jobs.order_by("id"))
    assert [(job.spec["learning_rate"], job.spec["lora_r"]) for job in runs] == [
        (1e-3, 4), (1e-3, 8), (2e-3, 4), (2e-3, 8)]
    assert all(job.spec["max_steps"] == 30 and job.spec["method"] == "lora" for job in runs)  # the rest as set
    assert runs[0].name == "rewrites · lora · learning_rate 0.001, lora_r 4"
    assert group.swept == {"learning_rate": [1e-3, 2e-3], "lora_r": [4, 8]}
    assert len(train_queue()) == 4
    page = owner_client.get(reply.url).content.decode()
    assert all(f'id="run-{job.id}"' in page for job in runs) and 'id="cancel-group"' in page


def test_a_method_sweep_gives_each_method_its_suggested_learning_rate(owner_client, dataset):
    sweep(owner_client, dataset, sweep_method=["lora", "full"])
    rates = {job.spec["method"]: job.spec["learning_rate"] for job in Job.objects.all()}
    assert rates == {method: FAMILIES["sft"].suggested.learning_rates[method] for method in ("lora", "full")}


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"sweep_learning_rate": "1e-3"}, "sweep_learning_rate", "Give 2 to 4 different values"),
    ({"sweep_learning_rate": "1e-3, 1e-3"}, "sweep_learning_rate", "Give 2 to 4 different values"),
    ({"sweep_lora_r": "4, 8, 16, 32, 64"}, "sweep_lora_r", "Give 2 to 4 different values"),
    ({"sweep_max_steps": "ten, twenty"}, "sweep_max_steps", "numbers separated by commas"),
    ({"sweep_learning_rate": "1e-3, 2"}, "sweep_learning_rate", "The run with learning_rate 2.0: must be below 1"),
    ({"sweep_method": ["lora", "head"]}, "sweep_method", "head does not apply to sft"),
    ({"sweep_method": ["lora"]}, "sweep_method", "Choose two methods or more"),
    ({"sweep_learning_rate": "1e-3,2e-3,3e-3,4e-3", "sweep_lora_r": "4,8,16,32"}, None, "makes 16 runs"),
])
def test_a_sweep_that_cannot_run_is_refused_where_it_is_wrong_and_starts_nothing(owner_client, dataset, fields,
                                                                                   field, says):
    reply = sweep(owner_client, dataset, **fields)
    assert reply.status_code == 200
    form = reply.context["form"]
    errors = form.errors.get(field or "__all__")
    assert errors and says in " ".join(errors), form.errors
    assert not Job.objects.exists() and not JobGroup.objects.exists()


def make_run(owner, dataset, group, lr, state, accuracy=None, losses=(), forgetting=None):
    job = Job.objects.create(owner=owner, dataset=dataset, group=group, name=f"lr {lr}",
                             spec={**VALID, "task": "classify", "learning_rate": lr, "dataset_name": "d"})
    job.append_events([make_event("eval", 0, baseline=True, accuracy=0.3),
                       *(make_event("metric", step, loss=loss, total_steps=len(losses))
                         for step, loss in enumerate(losses, 1))])
    result = {"metrics_after": {"accuracy": accuracy, "eval_loss": 1 - accuracy}} if accuracy is not None else {}
    if forgetting is not None:
        result["metrics_after"]["forgetting"] = forgetting
        result["metrics_before"] = {"accuracy": 0.3, "forgetting": 0.0}
    Job.objects.filter(id=job.id).update(state=state, result=result)
    job.refresh_from_db()
    return job


def test_the_group_page_marks_the_best_run_and_cancelling_ends_only_the_active_ones(owner_client, other_client,
                                                                                    owner, dataset):
    group = JobGroup.objects.create(owner=owner, name="sweep", swept={"learning_rate": [1e-3, 2e-3, 5e-3]})
    low = make_run(owner, dataset, group, 1e-3, "succeeded", accuracy=0.7, losses=(2.0, 1.5))
    high = make_run(owner, dataset, group, 2e-3, "succeeded", accuracy=0.9, losses=(2.0, 1.0))
    running = make_run(owner, dataset, group, 5e-3, "training", losses=(2.0,))
    status = owner_client.get(f"/jobs/groups/{group.id}/status/").json()
    assert status["best"] == high.id and status["active"]
    assert [job["after"] for job in status["jobs"]] == [0.7, 0.9, None]
    assert status["curves"][0]["loss"] == [[1, 2.0], [2, 1.5]] and status["curves"][0]["evals"]["accuracy"] == [[0, 0.3]]
    page = owner_client.get(f"/jobs/groups/{group.id}/").content.decode()
    assert f'<tr id="run-{high.id}" class="best">' in page
    assert 'id="differing-settings"' in page and "learning_rate" in page

    for path in ("", "status/"):
        assert other_client.get(f"/jobs/groups/{group.id}/{path}").status_code == 404
    assert other_client.post(f"/jobs/groups/{group.id}/cancel/").status_code == 404
    owner_client.post(f"/jobs/groups/{group.id}/cancel/")
    assert [Job.objects.get(id=job.id).state for job in (low, high, running)] == ["succeeded", "succeeded", "cancelled"]


def test_the_compare_page_lists_only_the_settings_that_differ_and_the_metrics_side_by_side(owner_client, owner,
                                                                                            dataset):
    jobs = [make_run(owner, dataset, None, lr, "succeeded", accuracy=acc, losses=(1.0,))
            for lr, acc in ((1e-3, 0.6), (2e-3, 0.8), (3e-3, 0.7))]
    reply = owner_client.get(f"/jobs/compare/?jobs={','.join(str(job.id) for job in jobs)}")
    assert reply.status_code == 200
    context = reply.context
    assert [row["name"] for row in context["differing"]] == ["learning_rate"]
    accuracy = next(row for row in context["final_metrics"] if row["name"] == "accuracy")
    assert accuracy["values"] == [0.6, 0.8, 0.7] and accuracy["best"] == 1
    loss = next(row for row in context["final_metrics"] if row["name"] == "eval_loss")
    assert loss["best"] == 1  # lower is better
    assert len(context["curves"]) == 3 and 'id="loss-curves"' in reply.content.decode()


def test_the_group_page_marks_the_best_trade_off_between_accuracy_and_forgetting(owner_client, owner, dataset):
    """From 0.3 at step 0: +0.5 for 0.02 forgetting beats +0.6 for 0.30 (0.5/0.6 - 0.02/0.3 > 1 - 1)."""
    group = JobGroup.objects.create(owner=owner, name="sweep", swept={"learning_rate": [1e-3, 2e-3, 5e-3]})
    gentle = make_run(owner, dataset, group, 1e-3, "succeeded", accuracy=0.8, forgetting=0.02)
    strong = make_run(owner, dataset, group, 2e-3, "succeeded", accuracy=0.9, forgetting=0.30)
    worse = make_run(owner, dataset, group, 5e-3, "succeeded", accuracy=0.75, forgetting=0.05)
    status = owner_client.get(f"/jobs/groups/{group.id}/status/").json()
    assert status["best"] == strong.id and status["balanced"] == gentle.id
    assert [job["forgetting"] for job in status["jobs"]] == [0.02, 0.30, 0.05]
    page = owner_client.get(f"/jobs/groups/{group.id}/").content.decode()
    row = page[page.index(f'id="run-{gentle.id}"'):page.index("</tr>", page.index(f'id="run-{gentle.id}"'))]
    assert '<span class="badge" data-balanced>best trade-off</span>' in row and "0.0200" in row
    assert page.count('<span class="badge" data-balanced>') == 1 and worse.id


def test_without_forgetting_no_run_is_marked_as_the_best_trade_off(owner_client, owner, dataset):
    group = JobGroup.objects.create(owner=owner, name="sweep", swept={"learning_rate": [1e-3, 2e-3]})
    for lr, accuracy in ((1e-3, 0.7), (2e-3, 0.9)):
        make_run(owner, dataset, group, lr, "succeeded", accuracy=accuracy)
    assert owner_client.get(f"/jobs/groups/{group.id}/status/").json()["balanced"] is None
