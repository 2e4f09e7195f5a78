"""The dataset page in a real browser: review the rejected rows, train on the rest, then the
quality report (histogram with the cutoff, the checks table) and the pre-flight token view."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_browser import ARTIFACTS, browser, signed_in_page  # noqa: F401 - browser is a fixture

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")
MAX_LENGTH = 64


def sft_lines() -> list[str]:
    """Twelve rows, two of them long, and three bad lines (4, 7 and 10)."""
    rows = [{"instruction": f"What is {n} plus {n}?", "response": f"{n} plus {n} is {2 * n}."} for n in range(12)]
    rows[2]["response"] = "Counting slowly: " + " ".join(str(n) for n in range(60)) + "."
    rows[5]["system"] = "You answer in one sentence."
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, '{"instruction": "An unclosed quote, "response": "x"}')
    lines.insert(6, json.dumps({"instruction": "No response here"}))
    lines.insert(9, json.dumps({"instruction": "   ", "response": "An empty instruction"}))
    return lines


def test_review_train_on_the_usable_rows_and_read_the_quality_report(stack, browser, tmp_path):  # noqa: F811
    stack.start_cpu_worker()  # the quality report is computed on the cpu queue
    upload = tmp_path / "arithmetic.jsonl"
    upload.write_text("\n".join(sft_lines()) + "\n")
    page = signed_in_page(stack, browser, "gwen")

    page.goto(f"{stack.base_url}/datasets/upload/")
    page.set_input_files("input[name=file]", str(upload))
    page.fill("input[name=name]", "Arithmetic")
    page.click("#upload-form button[type=submit]")
    page.wait_for_url(re.compile(r"/datasets/\d+/$"))  # not the upload page's own /datasets/upload/

    # The review names each rejected line and offers to train on the rest.
    assert "12 usable rows, 3 rejected" in page.text_content("#review")
    rejected = page.eval_on_selector_all(
        "#rejected-rows tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    assert [line for line, _, _ in rejected] == ["4", "7", "10"]
    assert "response" in rejected[1][1] and "whitespace" in rejected[2][2]
    page.click("#accept-rows")
    page.wait_for_selector("#train-on-dataset")
    assert page.text_content("#dataset-status").strip() == "ready"
    assert page.locator("#review").count() == 0

    # Compute the report for a short max length: the long row is cut.
    page.fill("#quality-length", str(MAX_LENGTH))
    page.click("#quality-form button[type=submit]")
    try:
        page.wait_for_selector("#quality[data-state=done]", state="attached", timeout=240_000)
    except playwright.TimeoutError:
        tasks = [line for line in (stack.logs / "cpu.log").read_text().splitlines() if "quality" in line]
        pytest.fail(f"no report: {page.text_content('#quality-status')!r}; cpu worker: {tasks}")
    assert page.text_content("#quality-status") == ""

    histogram = page.evaluate(
        """() => { const plot = document.getElementById('quality-lengths');
                   return {type: plot.data[0].type, counts: plot.data[0].y, shapes: plot.layout.shapes}; }"""
    )
    assert histogram["type"] == "bar" and sum(histogram["counts"]) == 12
    cutoff = [shape for shape in histogram["shapes"] if shape.get("name") == "cutoff"]
    assert len(cutoff) == 1 and cutoff[0]["x0"] == cutoff[0]["x1"] == MAX_LENGTH
    assert page.locator("#quality-lengths .shapelayer path").count() >= 1  # drawn, not only described
    widths = page.evaluate(
        "() => [document.getElementById('quality-lengths')._fullLayout.width,"
        " document.querySelector('#quality .charts').clientWidth]"
    )
    assert widths[0] >= 0.9 * widths[1]  # no label chart for instruction tuning: the histogram is full width

    checks = dict(
        page.eval_on_selector_all(
            "#quality-problems tbody tr", "rows => rows.map(r => [r.dataset.key, r.cells[1].textContent])"
        )
    )
    assert checks["truncated"] == "1" and checks["duplicates"] == "0" and checks["empty_system"] == "11"
    assert f"Cutoff {MAX_LENGTH} tokens: 1 row is longer" in " ".join(page.text_content("#quality-summary").split())

    # The pre-flight shows the first rows token by token: the reply highlighted, the prompt dimmed.
    preflight = page.locator("#quality-preflight .preflight")
    assert preflight.count() == 3
    first = preflight.first
    assert first.locator("pre.tokens .tok.loss").count() > 0 and first.locator("pre.tokens .tok.masked").count() > 0
    reply = "".join(first.locator(".tok.loss").all_text_contents())
    assert "0 plus 0 is 0." in reply and "What is" not in reply
    loss_colour = first.locator(".tok.loss").first.evaluate("e => getComputedStyle(e).backgroundColor")
    masked_colour = first.locator(".tok.masked").first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert loss_colour != masked_colour
    long_row = page.locator("#quality-preflight .preflight[data-row='3']")
    assert long_row.locator(".cutoff-mark").count() == 1 and long_row.locator(".tok.past-cutoff").count() > 0

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dataset.png"), full_page=True)
