"""The web UI in a real headless Chromium, used as a person would: open the printed URL, fill the
new-run form for the bundled tiny model and data, start, watch the loss chart and a validation grid,
stop (a checkpoint appears), resume, finish, download the LoRA, render a sample, resize the LoRA.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright's Python package, which
drives that browser without downloading its own. Screenshots go to ``$TUNER_SCREENSHOTS`` when set
(a folder relative to the repository: ``TUNER_SCREENSHOTS=docs pytest tests/test_webui_browser.py`` refreshes the ones in the docs).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import REPO, base_settings, train
from .webui_support import TOKEN, live_server, make_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    pytest.fail("CI must run the browser tests: install Debian's chromium (.ci/run does)", pytrace=False)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def wait_until(page, expression: str, timeout: float = 30_000) -> None:
    """Poll ``expression`` in the page (Playwright's wait_for_function evaluates strings with eval,
    which the UI's Content-Security-Policy forbids, as it should)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > deadline:
            shown = page.evaluate("() => document.querySelector('main').innerText")[:1500]
            raise AssertionError(f"timed out waiting for {expression}; the page shows:\n{shown}")
        page.wait_for_timeout(100)


def fill(page, key: str, value: str) -> None:
    field = page.locator(f"#k-{key}")
    if not field.is_visible():  # an advanced key: open its group's "advanced" section
        field.locator("xpath=ancestor::details").locator("summary").click()
    if field.evaluate("e => e.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)


@pytest.mark.slow
def test_a_person_trains_watches_stops_resumes_downloads_and_samples(browser, tmp_path, monkeypatch):
    # the README's bundled tiny model and its 20 images in three aspect ratios
    workspace = make_workspace(
        tmp_path, REPO / "examples" / "models" / "tiny-chroma", REPO / "examples" / "data" / "shapes"
    )
    monkeypatch.chdir(workspace)  # what `tuner server` does
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training jobs share two cores with the browser
    shots = REPO / os.environ["TUNER_SCREENSHOTS"] if os.environ.get("TUNER_SCREENSHOTS") else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    # a run started from a terminal earlier, with a held-out eval loss: the list shows it too
    terminal = {
        **base_settings(workspace / "models" / "tiny-chroma", workspace / "data" / "shapes", workspace),
        "output_dir": str(workspace / "output" / "from-terminal"),
        "max_train_steps": 12,
        "eval_steps": 6,
        "eval_split": 2,
    }
    train(terminal)
    with live_server(workspace) as (url, _):
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        problems, hosts = [], set()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: hosts.add(urlparse(r.url).hostname))

        page.goto(f"{url}/?token={TOKEN}")  # the URL tuner server prints
        assert page.url == f"{url}/"  # the token moved into a cookie, out of the address bar
        terminal_row = page.locator("#runs tr[data-path='output/from-terminal']")
        terminal_row.wait_for()
        assert "12 / 12" in terminal_row.inner_text() and terminal_row.get_attribute("data-status") == "finished"
        assert re.fullmatch(r"\d+\.\d{4}", terminal_row.locator("td").nth(6).inner_text())  # its eval loss

        page.click("text=New run")
        page.wait_for_selector("#new-run")
        assert page.locator("#family").input_value() == "chroma"
        fill(page, "pretrained_model_name_or_path", "models/tiny-chroma")
        page.click("button.browse[data-target=k-data_dir]")  # the data picker, limited to the workspace
        page.click("#picker-folders >> text=data/")
        page.locator("#picker-path", has_text="data").wait_for()
        page.click("#picker-folders >> text=shapes/")
        page.locator("#picker-path", has_text="data/shapes").wait_for()
        page.click("#picker-use")
        assert page.locator("#k-data_dir").input_value() == "data/shapes"
        wait_until(page, "document.querySelectorAll('#thumbs img').length === 20")
        wait_until(page, "document.querySelector('#data-summary').textContent.includes('20 images')")
        fill(page, "output_dir", "output/tiny")
        fill(page, "network_rank", "4")
        fill(page, "learning_rate", "abc")  # a mistake: the CLI's one-line message, next to the field
        error = page.locator('.error[data-for="learning_rate"]')
        error.wait_for()
        assert re.fullmatch(r"configs/tiny\.yaml: learning_rate: .+", error.inner_text())
        fill(page, "learning_rate", "0.001")
        wait_until(page, "!document.querySelector('.error[data-for=learning_rate]').textContent")
        fill(page, "mixed_precision", "no")
        fill(page, "resolution", "64")
        fill(page, "tokenizer_max_length", "16")
        fill(page, "max_train_steps", "100000")  # stopped by hand, then resumed to a shorter total
        fill(page, "validation_prompts", "a red circle on a white background")
        fill(page, "validation_steps", "20")
        fill(page, "validation_num_inference_steps", "2")
        fill(page, "validation_guidance_real", "1.0")
        wait_until(page, "document.querySelector('#buckets').textContent.includes('bucket(s) for 20 image(s)')")
        wait_until(page, "document.querySelector('#estimate').textContent.includes('peak')", timeout=60_000)
        assert "64 px" in page.locator("#estimate").inner_text()  # the estimate follows the resolution field
        page.screenshot(path=str(shots / "webui-new-run.png"), full_page=True)

        page.click("#start")
        page.wait_for_url(f"{url}/run/output/tiny")
        wait_until(page, "Number(document.querySelector('#loss-chart').dataset.points) >= 30", timeout=90_000)
        wait_until(
            page,
            "document.querySelector('#grid-b').src.includes('/validation/') && document.querySelector('#grid-b').naturalWidth > 0",
            timeout=60_000,
        )
        assert page.locator("#status").inner_text() == "training"
        assert "steps/s" in page.locator("#progress-text").inner_text()

        page.click("#stop")  # SIGTERM: the run finishes its step and saves a checkpoint
        wait_until(page, "document.querySelector('#status').textContent === 'stopped'", timeout=60_000)
        stopped = int(page.locator("#progress-text").get_attribute("data-step"))
        wait_until(page, f"document.querySelector('#checkpoints').textContent.includes('checkpoint-{stopped}')")
        assert (workspace / "output" / "tiny" / f"checkpoint-{stopped}" / "manifest.json").is_file()

        page.fill("#resume-steps", str(stopped + 15))
        page.click("#resume")
        wait_until(page, "document.querySelector('#status').textContent === 'finished'", timeout=120_000)
        assert int(page.locator("#progress-text").get_attribute("data-step")) == stopped + 15
        page.select_option("#compare-a", index=0)  # the first validation grid beside the last
        wait_until(page, "document.querySelector('#grid-a').naturalWidth > 0")

        lora = workspace / "output" / "tiny" / "pytorch_lora_weights.safetensors"
        link = page.locator("a.download", has_text="pytorch_lora_weights.safetensors")
        with page.expect_download() as download:
            link.click()
        assert Path(download.value.path()).read_bytes() == lora.read_bytes()
        with page.expect_download() as download:
            page.locator("a.download", has_text="recipe.json").click()
        assert Path(download.value.path()).read_bytes() == (lora.parent / "recipe.json").read_bytes()

        page.fill("#sample-prompt", "a blue square")
        page.fill("#sample-form input[name=steps]", "2")
        page.fill("#sample-form input[name=seed]", "7")
        page.click("#sample")
        wait_until(page, "[...document.querySelectorAll('#samples img')].some(i => i.naturalWidth > 0)", timeout=90_000)
        assert list((lora.parent / "samples").glob("*/00_seed7.png"))
        page.fill("#lora-rank", "2")  # the LoRA tools: a queued `tuner lora resize`, its file listed when done
        page.click("#lora-resize")
        wait_until(page, "document.querySelector('#files').textContent.includes('rank2')", timeout=60_000)
        assert (lora.parent / "pytorch_lora_weights_rank2.safetensors").is_file()
        page.screenshot(path=str(shots / "webui-run.png"), full_page=True)
        page.fill("#resume-steps", str(stopped))  # below its last checkpoint: the CLI refuses, the page says why
        page.click("#resume")
        wait_until(
            page, "document.querySelector('#run-error').textContent.includes('nothing to train')", timeout=60_000
        )
        assert page.locator("#status").inner_text() == "finished"
        assert "resumed from" in page.locator("#log").inner_text()  # the earlier jobs' console stays above

        page.click("text=Runs")
        row = page.locator("#runs tr[data-path='output/tiny']")
        row.wait_for()
        assert row.get_attribute("data-status") == "finished"
        assert f"{stopped + 15} / {stopped + 15}" in row.inner_text()
        page.screenshot(path=str(shots / "webui-runs.png"), full_page=True)

        assert problems == []
        assert hosts == {"127.0.0.1"}  # nothing is fetched from anywhere else (no CDN)
