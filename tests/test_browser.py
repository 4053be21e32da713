"""What a person does in a browser, in Debian's chromium driven by Playwright (headless).

Screenshots of each state go to test-output/browser/ — look at them after a change to the UI.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "browser"
CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 240_000
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"chromium not found at {CHROMIUM}: install Debian's chromium (make test does)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, studio_app):
    _demo, url = studio_app
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#train")
    yield page
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def upload_photo(page, path: str) -> None:
    page.set_input_files("#photos input[type=file]", path)


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def drag_slider(page, elem_id: str, fraction: float) -> None:
    """Drag a slider's thumb with the mouse to ``fraction`` of its track (fires input + release)."""
    track = page.locator(f"#{elem_id} input[type=range]")
    box = track.bounding_box()
    value = float(track.input_value())
    lo, hi = float(track.get_attribute("min")), float(track.get_attribute("max"))
    start_x = box["x"] + box["width"] * (value - lo) / (hi - lo)
    y = box["y"] + box["height"] / 2
    page.mouse.move(start_x, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=8)
    page.mouse.up()


def preview_sources(page) -> list[str]:
    return page.locator("#previews img").evaluate_all("imgs => imgs.map(i => i.src)")


def wait_for_previews_with(page, text: str) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#previews')?.innerText || '').includes(t)", arg=text, timeout=TIMEOUT_MS
    )


def wait_for_status(page, text: str) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text, timeout=TIMEOUT_MS
    )


def test_photo_to_training_to_sliders_to_export_and_import(page, browser, studio_app, faces_dir, tmp_path):
    # 1. the demo banner says plainly that tiny-backbone images are noise
    assert "images are noise" in page.locator("#tiny-banner").inner_text()

    # 2. upload a selfie -> crop with mask overlay + report
    upload_photo(page, str(faces_dir / "scarletthead_woman" / "scarlett_0.jpg"))
    page.wait_for_selector("#crops img")
    assert "usable" in page.locator("#photo-report").inner_text()
    shot(page, "01-photo-prepared")

    # 3. train on tiny: the loss plot gains points, the gallery shows previews
    set_number(page, "steps", 12)
    page.click("#train")
    wait_for_status(page, "Finished")
    page.wait_for_selector("#previews img")
    assert "step 12 / 12" in page.locator("#status").inner_text()
    lines = page.locator("#loss-plot g.mark-line path").evaluate_all(
        "paths => paths.map(p => [getComputedStyle(p).stroke, (p.getAttribute('d').match(/L/g) || []).length])"
    )
    assert len(lines) == 2, "raw and smoothed loss"
    assert all(stroke != "none" for stroke, _ in lines), "the lines are drawn"
    assert all(segments == 11 for _, segments in lines), "one point per step"
    shot(page, "02-trained")

    # 4. trade-off sliders re-render the previews (their captions carry the settings they were
    #    rendered with; on the random tiny model the pixels themselves barely move)
    assert "t∈[400, 800]" in page.locator("#previews").inner_text()
    drag_slider(page, "band-lo", 0.1)
    lo = int(page.locator("#band-lo input[type=number]").input_value())
    assert lo < 200, "the thumb moved left"
    wait_for_previews_with(page, f"t∈[{lo}, 800]")
    drag_slider(page, "balance", 0.9)
    gamma = float(page.locator("#balance input[type=number]").input_value())
    assert gamma > 2, "the thumb moved right"
    wait_for_previews_with(page, f"γ={gamma:g}")
    assert len(preview_sources(page)) == 4
    shot(page, "03-sliders-moved")

    # 4b. continue the run by 6 steps: the loss curve goes on, the previews follow the sliders
    set_number(page, "steps", 6)
    page.click("#continue")
    wait_for_status(page, "step 18 / 18")
    wait_for_status(page, "Finished")
    wait_for_previews_with(page, "step 18")
    assert f"t∈[{lo}, 800]" in page.locator("#previews").inner_text()
    segments = page.locator("#loss-plot g.mark-line path").evaluate_all(
        "paths => paths.map(p => (p.getAttribute('d').match(/L/g) || []).length)"
    )
    assert segments == [17, 17], "one point per step, 1 to 18"
    shot(page, "03b-continued")

    # 5. export the concept
    page.get_by_role("tab", name="Concept file").click()
    page.click("#export")
    link = page.locator("#export-file a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    concept_path = tmp_path / "exported.safetensors"
    download.value.save_as(concept_path)
    assert concept_path.stat().st_size > 1000
    shot(page, "04-exported")

    # 6. a fresh page imports it and generates
    _demo, url = studio_app
    fresh = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    fresh.set_default_timeout(TIMEOUT_MS)
    fresh.goto(url)
    fresh.wait_for_selector("#train")
    fresh.get_by_role("tab", name="Concept file").click()
    fresh.set_input_files("#import input[type=file]", str(concept_path))
    fresh.wait_for_function("() => (document.querySelector('#concept-msg')?.innerText || '').includes('Loaded')")
    fresh.wait_for_selector("#previews img")  # the imported concept's previews, without retraining
    assert "step 18" in fresh.locator("#previews").inner_text()
    # the file brought the trade-off sliders' values with it
    assert int(fresh.locator("#band-lo input[type=number]").input_value()) == lo
    assert float(fresh.locator("#balance input[type=number]").input_value()) == pytest.approx(gamma)
    assert f"t∈[{lo}, 800]" in fresh.locator("#previews").inner_text()
    fresh.get_by_role("tab", name="Create images").click()
    set_number(fresh, "gen-steps", 3)
    set_number(fresh, "gen-seed", 0)
    fresh.click("#generate")
    fresh.wait_for_selector("#generated img")
    assert fresh.locator("#generated img").count() >= 1
    caption = fresh.locator("#generated").inner_text()
    assert "3 steps" in caption and "identity in" in caption and "γ=" in caption, caption
    shot(fresh, "05-imported-and-generated")

    # 7. the file carried the training state: with the same photo, Train more goes on from step 18
    assert "press Train more" in fresh.locator("#status").inner_text()
    upload_photo(fresh, str(faces_dir / "scarletthead_woman" / "scarlett_0.jpg"))
    fresh.wait_for_selector("#crops img")
    set_number(fresh, "steps", 2)
    fresh.click("#continue")
    wait_for_status(fresh, "step 20 / 20")
    wait_for_status(fresh, "Finished")
    shot(fresh, "05b-continued-in-another-session")
    fresh.context.close()


def test_bad_files_show_their_message_and_the_page_stays_usable(page, faces_dir, tmp_path):
    not_image = tmp_path / "holiday.jpg"
    not_image.write_text("%PDF-1.4 this is really a document")
    upload_photo(page, str(not_image))
    page.wait_for_function("() => (document.querySelector('#photo-report')?.innerText || '').includes('✗')")
    assert "image" in page.locator("#photo-report").inner_text().lower()
    shot(page, "06-not-an-image")

    from PIL import Image

    no_face = tmp_path / "wall.png"
    Image.new("RGB", (640, 480), (180, 170, 160)).save(no_face)
    upload_photo(page, str(no_face))
    page.wait_for_function("() => (document.querySelector('#photo-report')?.innerText || '').toLowerCase().includes('face')")
    assert "✗" in page.locator("#photo-report").inner_text()
    shot(page, "07-no-face")

    page.get_by_role("tab", name="Concept file").click()
    corrupt = tmp_path / "concept.safetensors"
    corrupt.write_bytes(b"\x00" * 8 + b"not json at all")
    page.set_input_files("#import input[type=file]", str(corrupt))
    page.wait_for_function("() => (document.querySelector('#concept-msg')?.innerText || '').includes('✗')")
    shot(page, "08-corrupt-concept")

    # still usable: the bundled sample photo is accepted afterwards
    page.get_by_text("astronaut.png").first.click()
    page.wait_for_selector("#crops img")
    assert "✓ astronaut.png" in page.locator("#photo-report").inner_text()
    shot(page, "09-sample-photo")
