from pathlib import Path

from django.contrib import messages
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp.datasets import samples
from webapp.datasets.models import READY, Dataset
from webapp.exports.models import Export
from webapp.jobs import comparison, evaluations, playground
from webapp.jobs.downloads import file_download
from webapp.jobs.forms import JobForm, describe_run
from webapp.jobs.models import CANCELLED, SUCCEEDED, Job, JobGroup
from worker.catalog import CATALOG
from worker.families import FAMILIES, suggested_settings


def _jobs_for_user(user):
    jobs = Job.objects.select_related("dataset", "owner")
    return jobs if user.is_staff else jobs.filter(owner=user)


def _get_job_for_user(request: HttpRequest, job_id: int) -> Job:
    return get_object_or_404(_jobs_for_user(request.user), id=job_id)


def home(request: HttpRequest) -> HttpResponse:
    jobs = _jobs_for_user(request.user)[:200]
    comparable = Job.objects.filter(owner=request.user, state=SUCCEEDED).count() >= 2
    return render(request, "jobs/list.html", {"jobs": jobs, "comparable": comparable})


def new_job(request: HttpRequest) -> HttpResponse:
    initial = {"dataset": request.GET.get("dataset")}
    chosen = _chosen_dataset(request)
    if chosen is not None and not chosen.is_ready:
        messages.error(request, f"{chosen.name} is {chosen.get_status_display()}: it can be trained on once it is ready.")
        return redirect("dataset", chosen.id)
    if request.GET.get("from"):
        # Retry / clone: the settings of an earlier job, prefilled.
        if not request.GET["from"].isdigit():
            raise Http404("No such job.")
        initial = JobForm.initial_from(_get_job_for_user(request, int(request.GET["from"])))
    form = JobForm(request.POST or None, user=request.user, initial=initial)
    if request.method == "POST" and form.is_valid():
        dataset = form.cleaned_data["dataset"]
        name = form.cleaned_data["name"] or f"{dataset.name} · {form.choices.method}"
        if len(form.runs) == 1:
            return redirect(Job.start(request.user, dataset, form.spec_dict(), name=name))
        return redirect(_start_sweep(request.user, dataset, form, name))
    datasets = {d.id: d.task for d in form.fields["dataset"].queryset}
    with_validation = [d.id for d in form.fields["dataset"].queryset if d.has_validation]
    context = {"form": form, "catalog": CATALOG.values(), "tasks": FAMILIES.values(), "extra_samples": samples.EXTRA, "dataset_tasks": datasets,
               "dataset_validation": with_validation, "suggested": suggested_settings()}
    return render(request, "jobs/new.html", context)


def _start_sweep(user, dataset: Dataset, form: JobForm, name: str) -> JobGroup:
    """One job per run of the form's sweep, in one group, all queued together."""
    swept: dict[str, list] = {}
    for values, _ in form.runs:
        for setting, value in values.items():
            swept.setdefault(setting, [])
            if value not in swept[setting]:
                swept[setting].append(value)
    with transaction.atomic():
        group = JobGroup.objects.create(owner=user, name=f"{name} (sweep)", swept=swept)
        for values, choices in form.runs:
            Job.start(user, dataset, form.spec_dict(choices), name=f"{name} · {describe_run(values)}", group=group)
    return group


def _chosen_dataset(request: HttpRequest) -> Dataset | None:
    """The user's dataset named by ?dataset= (the "Train on this dataset" link), if any."""
    dataset_id = request.GET.get("dataset", "")
    return Dataset.objects.filter(owner=request.user, id=dataset_id).first() if dataset_id.isdigit() else None


def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job_for_user(request, job_id)
    if job.is_evaluation:
        board = evaluations.table(job.result.get("leaderboard", []))
        return render(request, "jobs/evaluation.html", {"job": job, "board": board})
    context = {
        "job": job, "events": job.history(), "base": CATALOG.get(job.spec["base_model"]),
        "lineage": _lineage(job),
        "task": FAMILIES[job.spec.get("task", "sft")],
        # The playground asks the owner's own models (staff may read another user's page, not run it).
        "playground": playground.for_job(job) if job.state == SUCCEEDED and job.owner_id == request.user.id else None,
        # Exports are the owner's alone, like their downloads.
        "exports": Export.offers_for(job) if job.owner_id == request.user.id and Export.refusal(job, "merged") is None else None,
    }
    context["checkpoints"] = _checkpoints(job, context["task"].primary_metric)
    context["test_sets"] = _test_sets(job) if job.owner_id == request.user.id else None
    return render(request, "jobs/detail.html", context)


def compare(request: HttpRequest) -> HttpResponse:
    """?jobs=3,5,7: one input to the fine-tunes of up to four jobs of one task and base; without
    ?jobs=, the user's succeeded jobs to choose from."""
    chosen = request.GET.getlist("jobs")
    if chosen:
        try:
            jobs = playground.jobs_to_compare(request.user, chosen)
        except playground.NotComparable as refusal:
            context = {"groups": playground.comparable_groups(request.user), "refusal": str(refusal)}
            return render(request, "jobs/compare_pick.html", context, status=400)
        context = {"jobs": jobs, "playground": playground.for_comparison(jobs), "title": playground.describe(jobs[0]),
                   **_side_by_side(jobs)}
        return render(request, "jobs/compare.html", context)
    return render(request, "jobs/compare_pick.html", {"groups": playground.comparable_groups(request.user)})


@require_POST
def cancel_job(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job_for_user(request, job_id)
    if job.transition(CANCELLED, message="Cancelled by the user."):
        messages.info(request, "Job cancelled.")
    else:
        messages.warning(request, f"The job is already {job.state}.")
    return redirect(job)


def download(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job_for_user(request, job_id)
    artifact = job.artifact_zip
    if job.state != SUCCEEDED or artifact is None:
        raise Http404("This job has no artifact to download.")
    return file_download(request, artifact, filename=artifact.name)


def download_checkpoint(request: HttpRequest, job_id: int, step: int) -> HttpResponse:
    """One of the checkpoints a job kept for download (the trade-off table on its page)."""
    job = _get_job_for_user(request, job_id)
    artifact = job.checkpoint_zip(step) if job.state == SUCCEEDED else None
    if artifact is None:
        raise Http404("This job kept no checkpoint of that step.")
    return file_download(request, artifact, filename=artifact.name)


def _lineage(job: Job) -> dict | None:
    """The Base model row of a job built on another: the root base's name, then each job between."""
    root, ancestors = job.lineage()
    if not ancestors:
        return None
    entry = CATALOG.get(root)
    return {"root": entry.name if entry else root, "jobs": ancestors}


def _test_sets(job: Job) -> list[Dataset] | None:
    """The owner's ready datasets a succeeded job can be evaluated on (its task's), its own
    training set last; None when the job has nothing to evaluate."""
    if job.state != SUCCEEDED or job.is_evaluation:
        return None
    datasets = Dataset.objects.filter(owner=job.owner, status=READY, task=job.spec.get("task"))
    return sorted(datasets.order_by("-created_at")[:20], key=lambda dataset: dataset.id == job.dataset_id)


def _checkpoints(job: Job, primary: str) -> list[dict]:
    """The trade-off table's rows: each kept checkpoint's step, metrics and download link."""
    if job.state != SUCCEEDED:
        return []
    rows = []
    for entry in job.result.get("checkpoints") or []:
        url = reverse("download", args=[job.id]) if entry["final"] else reverse("download_checkpoint",
                                                                                  args=[job.id, entry["step"]])
        rows.append({"step": entry["step"], "final": entry["final"], "balanced": entry["balanced"], "url": url,
                     "metric": entry["metrics"].get(primary), "forgetting": entry["metrics"].get("forgetting")})
    return rows



def _side_by_side(jobs: list[Job]) -> dict:
    """What the compare and sweep pages show of several jobs: curves, differing settings, metrics."""
    best = comparison.best_job(jobs)
    return {"curves": comparison.curves(jobs), "differing": comparison.differing_settings(jobs),
            "final_metrics": comparison.final_metrics(jobs), "best": best, "balanced": comparison.balanced_job(jobs),
            "primary": comparison.primary_metric(jobs[0]) if jobs else ""}


def _get_group_for_user(request: HttpRequest, group_id: int) -> JobGroup:
    return get_object_or_404(JobGroup, id=group_id, owner=request.user)


def job_group(request: HttpRequest, group_id: int) -> HttpResponse:
    """A sweep's runs, compared live: each run's state and metrics, the best marked, the curves."""
    group = _get_group_for_user(request, group_id)
    jobs = list(group.jobs.select_related("dataset").order_by("id"))
    context = {"group": group, "jobs": jobs, "active": any(not job.is_final for job in jobs), **_side_by_side(jobs)}
    context["runs"] = [(job, _after(job, context["primary"]), _after(job, "forgetting")) for job in jobs]
    return render(request, "jobs/group.html", context)


def _after(job: Job, metric: str) -> float | None:
    return (job.result.get("metrics_after") or {}).get(metric)


def job_group_status(request: HttpRequest, group_id: int) -> JsonResponse:
    """The group page's live data, polled while a run is queued or running."""
    group = _get_group_for_user(request, group_id)
    jobs = list(group.jobs.order_by("id"))
    best, balanced = comparison.best_job(jobs), comparison.balanced_job(jobs)
    primary = comparison.primary_metric(jobs[0]) if jobs else ""
    return JsonResponse({
        "active": any(not job.is_final for job in jobs), "best": best.id if best else None,
        "balanced": balanced.id if balanced else None,
        "jobs": [{"id": job.id, "state": job.state, "step": job.step, "total_steps": job.total_steps,
                  "after": _after(job, primary), "forgetting": _after(job, "forgetting")} for job in jobs],
        "curves": comparison.curves(jobs),
    })


@require_POST
def cancel_job_group(request: HttpRequest, group_id: int) -> HttpResponse:
    group = _get_group_for_user(request, group_id)
    cancelled = group.cancel()
    messages.info(request, f"Cancelled {cancelled} run{'s' if cancelled != 1 else ''} of the sweep."
                  if cancelled else "Every run of the sweep had already ended.")
    return redirect(group)


@require_POST
def evaluate_dataset(request: HttpRequest, dataset_id: int) -> HttpResponse:
    """Start an evaluation of the chosen models on this dataset (its rows are the test set)."""
    dataset = get_object_or_404(Dataset, id=dataset_id, owner=request.user)
    page = f"{reverse('dataset', args=[dataset.id])}#evaluate"
    if not dataset.is_ready:
        messages.error(request, f"{dataset.name} is {dataset.get_status_display()}: it can be a test set once it is ready.")
        return redirect(page)
    form = evaluations.EvaluateForm(request.POST, dataset=dataset)
    if not form.is_valid():
        messages.error(request, " ".join(error for errors in form.errors.values() for error in errors))
        return redirect(page)
    return redirect(evaluations.start(request.user, dataset, form))


def _get_evaluation_for_user(request: HttpRequest, job_id: int) -> Job:
    job = _get_job_for_user(request, job_id)
    if not job.is_evaluation:
        raise Http404("This job is not an evaluation.")
    return job


def evaluation_rows(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    """Each test row with each model's output and score, sortable by the change."""
    job = _get_evaluation_for_user(request, evaluation_id)
    sort = request.GET.get("sort", "row")
    records = evaluations.row_records(job, sort)
    labels = [entry["label"] for entry in job.result.get("leaderboard", [])]
    return render(request, "jobs/evaluation_rows.html", {"job": job, "records": records, "labels": labels,
                                                          "sort": sort, "limit": evaluations.ROW_LIMIT})


def evaluation_csv(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    job = _get_evaluation_for_user(request, evaluation_id)
    path = Path(job.result.get("rows_csv", ""))
    if job.state != SUCCEEDED or not path.is_file():
        raise Http404("This evaluation has no rows to download.")
    return file_download(request, path, filename=f"specialist-evaluation-{job.id}.csv")
