"""A person's path through the app in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.support.stack import PASSWORD
from tests.test_classify_recipe import group_rows

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `make chromium` installs Debian's package")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def chart_steps(page) -> list[float]:
    return page.evaluate("() => Array.from(document.getElementById('loss-chart').data[0].x)")


def signed_in_page(stack, browser, username: str):
    stack.create_user(username)
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(f"{stack.base_url}/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")
    return page


def test_sign_in_upload_train_watch_and_download(stack, browser, tiny_llama_dir, sft_jsonl, tmp_path):
    page = signed_in_page(stack, browser, "erin")

    # Upload by dropping the file on the drop zone.
    page.goto(f"{stack.base_url}/datasets/upload/")
    page.evaluate(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name));
            document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
        }""",
        [sft_jsonl.name, sft_jsonl.read_text()],
    )
    assert page.text_content("#dropzone-text") == sft_jsonl.name
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/datasets/*/")
    rows = sum(1 for line in sft_jsonl.read_text().splitlines() if line.strip())
    assert f"{rows} usable" in page.text_content("#row-count")

    page.click("text=Train on this dataset")
    page.wait_for_url("**/jobs/new/?dataset=*")
    page.wait_for_load_state("load")  # the form's script has set its suggestions
    page.select_option("select[name=base_model]", "custom")
    page.fill("input[name=custom_base_model]", str(tiny_llama_dir))
    page.fill("input[name=max_steps]", "150")
    page.fill("input[name=batch_size]", "4")
    page.fill("input[name=max_seq_length]", "96")
    page.click("#train")
    page.wait_for_url("**/jobs/*/")

    # The chart gains points while the job trains, without a reload.
    # The worker imports torch, loads the model and measures the step-0 baseline first: on a
    # busy 2-core machine that alone can take a minute.
    page.wait_for_function("() => window.specialistJob.trainPoints >= 2", timeout=240_000)
    seen = len(chart_steps(page))
    page.wait_for_function(f"() => document.getElementById('loss-chart').data[0].x.length > {seen}")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert "trained" in page.text_content("#params-panel")

    # A reload mid-training redraws the history and carries on, with no duplicated point.
    page.reload()
    page.wait_for_function("() => window.specialistJob.trainPoints >= 1")
    page.wait_for_function("() => document.getElementById('state').textContent === 'succeeded'", timeout=300_000)
    steps = chart_steps(page)
    assert steps == sorted(set(steps)) and len(steps) == 150

    with page.expect_download() as download:
        page.click("#download")
    target = tmp_path / "adapter.zip"
    download.value.save_as(target)
    assert "adapter_model.safetensors" in {Path(n).name for n in zipfile.ZipFile(target).namelist()}

    # What it bought and cost: the held-out generations and the general answers, set as text; after
    # the reload it offers, the trade-off chart rings each checkpoint kept for download, and a kept
    # one downloads as an adapter.
    assert page.locator("#samples tbody tr").count() >= 1
    assert page.locator("#general-answers tbody tr").count() == 10
    page.click("#checkpoints-pending a")
    page.wait_for_selector("#checkpoints")
    page.wait_for_function("() => document.getElementById('tradeoff-chart').data")
    kept = page.locator("#checkpoints tbody tr")
    ringed = page.evaluate("() => document.getElementById('tradeoff-chart').data[1].x.length")
    assert kept.count() >= 1 and ringed == kept.count()
    assert page.locator("#checkpoints .badge").count() == 1  # one best trade-off
    earlier = page.locator("#checkpoints a", has_not_text="150")
    if earlier.count():  # an evaluation before the last one is on the front
        with page.expect_download() as download:
            earlier.first.click()
        target = tmp_path / "checkpoint.zip"
        download.value.save_as(target)
        names = zipfile.ZipFile(target).namelist()
        assert "adapter_model.safetensors" in {Path(n).name for n in names} and "-step-" in names[0]


def test_a_classifier_ends_with_a_before_after_table_and_a_confusion_heatmap(stack, browser, tiny_bert_dir, tmp_path):
    page = signed_in_page(stack, browser, "fran")
    http = stack.session("fran")
    dataset_id = stack.upload_dataset(http, write_jsonl(tmp_path / "groups.jsonl", group_rows()), task="classify")
    job_id = stack.submit_job(http, dataset_id, tiny_bert_dir, method="full", learning_rate=2e-2, max_steps=30,
                              batch_size=16, max_seq_length=32)
    page.goto(f"{stack.base_url}/jobs/{job_id}/")
    job = stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=400)
    assert job["state"] == "succeeded", (job["message"], stack.log_tail("worker"))
    page.wait_for_function("() => document.getElementById('state').textContent === 'succeeded'")
    result = job["result"]

    # The table compares the untouched base (step 0) with the fine-tuned model, metric by metric.
    page.wait_for_selector("#comparison:not(.hidden)")
    table = page.eval_on_selector_all(
        "#comparison tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    by_metric = {name: (before, after, change) for name, before, after, change in table}
    assert {"accuracy", "macro_f1"} <= set(by_metric)
    before, after, change = by_metric["accuracy"]
    assert float(before) == pytest.approx(result["metrics_before"]["accuracy"], abs=1e-4)
    assert float(after) == pytest.approx(result["metrics_after"]["accuracy"], abs=1e-4)
    assert float(change) == pytest.approx(float(after) - float(before), abs=2e-4) and float(change) > 0.3

    # The confusion matrix after training, drawn as a Plotly heatmap with the label names.
    page.wait_for_selector("#confusion:not(.hidden)")
    assert "after training" in page.text_content("#confusion h2")
    heatmap = page.evaluate(
        "() => { const t = document.querySelector('#confusion .plot').data[0]; return {type: t.type, z: t.z, x: t.x}; }"
    )
    assert heatmap == {"type": "heatmap", **{"z": result["confusion_after"]["matrix"],
                                             "x": result["confusion_after"]["labels"]}}
    assert page.locator("#confusion .plot svg").count() > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "classifier.png"), full_page=True)
