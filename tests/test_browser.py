"""A person's path through the app in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.stack import PASSWORD

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


def test_sign_in_upload_train_watch_and_download(stack, browser, tiny_llama_dir, sft_jsonl, tmp_path):
    stack.create_user("erin")
    page = browser.new_page(accept_downloads=True)
    page.set_default_timeout(60_000)

    page.goto(f"{stack.base_url}/")
    page.fill("input[name=username]", "erin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.base_url}/")

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
