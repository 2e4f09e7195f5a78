from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from webapp.datasets import samples
from webapp.datasets.models import Dataset
from webapp.exports.models import Export
from webapp.jobs import playground
from webapp.jobs.downloads import file_download
from webapp.jobs.forms import JobForm
from webapp.jobs.models import CANCELLED, SUCCEEDED, Job
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
        job = Job.start(request.user, dataset, form.spec_dict(),
                        name=form.cleaned_data["name"] or f"{dataset.name} · {form.choices.method}")
        return redirect(job)
    datasets = {d.id: d.task for d in form.fields["dataset"].queryset}
    with_validation = [d.id for d in form.fields["dataset"].queryset if d.has_validation]
    context = {"form": form, "catalog": CATALOG.values(), "tasks": FAMILIES.values(), "extra_samples": samples.EXTRA, "dataset_tasks": datasets,
               "dataset_validation": with_validation, "suggested": suggested_settings()}
    return render(request, "jobs/new.html", context)


def _chosen_dataset(request: HttpRequest) -> Dataset | None:
    """The user's dataset named by ?dataset= (the "Train on this dataset" link), if any."""
    dataset_id = request.GET.get("dataset", "")
    return Dataset.objects.filter(owner=request.user, id=dataset_id).first() if dataset_id.isdigit() else None


def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job_for_user(request, job_id)
    context = {
        "job": job, "events": job.history(), "base": CATALOG.get(job.spec["base_model"]), "parent": job.parent(),
        "task": FAMILIES[job.spec.get("task", "sft")],
        # The playground asks the owner's own models (staff may read another user's page, not run it).
        "playground": playground.for_job(job) if job.state == SUCCEEDED and job.owner_id == request.user.id else None,
        # Exports are the owner's alone, like their downloads.
        "exports": Export.offers_for(job) if job.owner_id == request.user.id and Export.refusal(job, "merged") is None else None,
    }
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
        context = {"jobs": jobs, "playground": playground.for_comparison(jobs), "title": playground.describe(jobs[0])}
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

