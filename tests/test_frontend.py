"""The Streamlit page in a real browser (Debian's chromium via Playwright) against the real service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from serve import free_port
from skinlesion.model import CLASS_NAMES
from tests.conftest import ROOT, ramp_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
STARTUP_SECONDS = 120
PAGE_MS = 90_000  # first render, uploads and reruns on a busy two-core machine
EXPLAIN_MS = 240_000  # a LIME explanation at Low precision, with room for a slow machine
RESULT = re.compile(r"probability \d+(\.\d+)?%")
CHECK_LINE = re.compile(r"^Hiding the highlighted area (drops|raises|leaves) .+; a random area of the same size: \d\.\d\d\.$")


@contextmanager
def streamlit_app(api_url: str, log: Path) -> Iterator[str]:
    """`streamlit run frontend/app.py` on a free port, talking to `api_url`; yields the page URL."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "frontend/app.py", "--server.port", str(port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, SKIN_API_URL=api_url), stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def app_url(service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with streamlit_app(service.predict_url, tmp_path_factory.mktemp("streamlit") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def closed_app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page pointed at a loopback port where nothing listens."""
    closed = f"http://127.0.0.1:{free_port()}/predict"
    with streamlit_app(closed, tmp_path_factory.mktemp("streamlit-closed") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (./setup.sh --dev does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser tab; its last state is saved to test-artifacts/<test>.png, pass or fail."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_MS)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=ARTIFACTS / f"{request.node.name}.png", full_page=True)
    finally:
        context.close()


def open_and_upload(page: Page, url: str, image: Path) -> None:
    page.goto(url)
    expect(page.get_by_role("heading", name="Skin lesion classifier")).to_be_visible(timeout=PAGE_MS)
    page.locator('input[type="file"]').set_input_files(image)


def expect_prediction(page: Page) -> None:
    result = page.get_by_text(RESULT)
    expect(result).to_be_visible(timeout=PAGE_MS)
    assert any(name in result.inner_text() for name in CLASS_NAMES), result.inner_text()
    # One chart on screen; Streamlit may keep a stale, hidden copy in the page while it replaces the layout.
    expect(page.locator('[data-testid="stVegaLiteChart"]').filter(visible=True)).to_be_visible(timeout=PAGE_MS)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)


def test_upload_shows_prediction_and_chart(page: Page, app_url: str, original_photo: Path) -> None:
    open_and_upload(page, app_url, original_photo)
    expect_prediction(page)
    expect(page.locator('[data-testid="stImage"]')).to_have_count(1)  # the original; no overlay without explain
    expect(page.get_by_text("not a diagnosis")).to_be_visible()
    expect(page.get_by_text("CC BY-NC 4.0")).to_be_visible()
    expect(page.get_by_text(re.compile(r"(Malignancy alert|Probability of a malignant lesion)"))).to_be_visible()
    # The prediction set under the label, with what its guarantee means.
    expect(page.get_by_text(re.compile(r"^90% set: "))).to_be_visible()
    expect(page.get_by_text(re.compile("not a promise for this one"))).to_be_visible()


def test_a_non_lesion_image_shows_the_warning_instead_of_the_label(page: Page, app_url: str, tmp_path: Path) -> None:
    noise = tmp_path / "noise.png"
    ramp_image().save(noise)
    open_and_upload(page, app_url, noise)
    expect(page.get_by_text("Not a usable lesion photo")).to_be_visible(timeout=PAGE_MS)
    expect(page.get_by_text(re.compile("does not look like the dermatoscopic lesion photos"))).to_be_visible()
    expect(page.get_by_text(RESULT)).to_have_count(0)  # no headline label, and no alert about a non-lesion
    expect(page.get_by_text("Malignancy alert", exact=True)).to_have_count(0)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)


def test_the_sidebar_shows_how_good_the_model_is(page: Page, app_url: str) -> None:
    page.goto(app_url)
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text("How good is this model?")).to_be_visible(timeout=PAGE_MS)
    # The served resnet34 was fitted as the shipped one, as weights trained on the test split too (conftest.py).
    caption = r"resnet34's recipe on [\d,]+ test images, trained without them \(the served weights were trained"
    expect(sidebar.get_by_text(re.compile(caption))).to_be_visible()
    expect(sidebar.get_by_text(re.compile(r"balanced accuracy \d+%"))).to_be_visible()
    expect(sidebar.get_by_text(re.compile(r"malignancy alert: finds \d+%"))).to_be_visible()


def test_explain_shows_overlay(page: Page, app_url: str, fullres_images: list[Path]) -> None:
    open_and_upload(page, app_url, fullres_images[1])
    expect_prediction(page)
    sidebar = page.get_by_test_id("stSidebar")
    # LIME (which enables its precision), then Low, then explain on: one LIME run at Low, not one at Medium as well.
    sidebar.get_by_test_id("stRadio").filter(has_text="Method").get_by_text("LIME", exact=True).click()
    sidebar.get_by_test_id("stRadio").filter(has_text="Precision").get_by_text("Low", exact=True).click()
    sidebar.get_by_text("Explain the prediction").click()
    overlay = page.get_by_alt_text("Explanation overlay")
    error = page.get_by_text("Could not classify")
    expect(overlay.or_(error)).to_be_visible(timeout=EXPLAIN_MS)
    assert not error.is_visible(), error.inner_text()
    expect(overlay).to_be_visible()
    expect(page.get_by_text(re.compile(r"LIME explanation \(Low"))).to_be_visible()
    expect(page.get_by_text(CHECK_LINE)).to_be_visible()
    expect_prediction(page)


def test_the_default_explanation_checks_itself_and_explains_a_class_of_the_top_three(page: Page, app_url: str,
                                                                                    original_photo: Path) -> None:
    open_and_upload(page, app_url, original_photo)
    expect_prediction(page)
    page.get_by_test_id("stSidebar").get_by_text("Explain the prediction").click()
    expect(page.get_by_text(re.compile(r"^Gradients explanation"))).to_be_visible(timeout=EXPLAIN_MS)
    expect(page.get_by_text(CHECK_LINE)).to_be_visible()
    page.get_by_test_id("stSelectbox").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(3)
    second = options.nth(1).inner_text().rsplit(" (", 1)[0]
    options.nth(1).click()
    expect(page.get_by_text(re.compile(rf"^Hiding the highlighted area \w+ {re.escape(second)} "))).to_be_visible(
        timeout=EXPLAIN_MS)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)


def test_unreachable_server_shows_readable_error(page: Page, closed_app_url: str, fullres_images: list[Path]) -> None:
    open_and_upload(page, closed_app_url, fullres_images[0])
    error = page.get_by_test_id("stAlert").filter(has_text="Could not classify")
    expect(error).to_be_visible(timeout=PAGE_MS)
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)
    assert "Traceback" not in page.content()


def test_the_page_takes_uploads_up_to_the_apis_image_limit() -> None:
    import tomllib

    import client

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == client.MAX_UPLOAD_MB
    body_limit = re.search(r"client_max_body_size (\d+)m;", (ROOT / "serving" / "nginx.conf").read_text())
    # The largest upload, in base64 with the JSON around it, fits nginx's body limit.
    assert client.MAX_UPLOAD_MB * 4 / 3 + 0.1 < int(body_limit[1])
