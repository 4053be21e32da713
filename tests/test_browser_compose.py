"""The Compose tab in a browser (headless chromium): two concept files side by side, then a bad prompt;
regions drawn by hand; an interrupted composition.

Screenshots go to test-output/browser/ (compose-*.png) — look at them after a change to the tab.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from studio.concept_file import save_concept
from studio.config import load_preset
from studio.ui.compose_tab import canvas_size
from test_browser import TIMEOUT_MS, browser, page, shot  # noqa: F401  (fixtures)
from test_sampler import make_concept

pytestmark = pytest.mark.browser


def _open_with_two_concept_files(page, backbone, tmp_path, seeds: tuple[int, int]) -> None:
    """Open the Compose tab with a concept file (random, on the test backbone) for each person."""
    files = [save_concept(make_concept(backbone, seed=s), tmp_path / f"p{s}.safetensors") for s in seeds]
    page.get_by_role("tab", name="Compose").click()
    # person {0} starts as this session's concept: no file box until a file is the source
    page.locator("#compose-file-1").wait_for(state="visible")
    assert not page.locator("#compose-file-0").is_visible()
    for index, path in enumerate(files):
        page.locator(f"#compose-kind-{index}").get_by_label("A concept file").check()
        page.locator(f"#compose-file-{index}").wait_for(state="visible")
        page.set_input_files(f"#compose-file-{index} input[type=file]", str(path))


def test_compose_two_concept_files_left_and_right_then_a_prompt_that_names_one(page, backbone, tmp_path):
    _open_with_two_concept_files(page, backbone, tmp_path, (21, 22))
    page.get_by_label("Left / right").check()
    steps = page.locator("#compose-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    shot(page, "compose-1-filled")
    page.locator("#compose").click()
    page.wait_for_selector("#composed img", timeout=TIMEOUT_MS)
    page.wait_for_selector("#compose-regions img", timeout=TIMEOUT_MS)
    page.wait_for_function("() => (document.querySelector('#compose-cost')?.innerText || '').includes('This run')")
    assert "This run: 1 UNet pass per step at 96 × 64" in page.locator("#compose-cost").inner_text()  # two people: wide
    assert "UNet pass" not in page.locator("#compose-scores").inner_text()  # the cost is said once
    for gallery in ("#composed", "#compose-regions"):  # the whole picture shows, not cut by its gallery
        picture, frame = page.locator(f"{gallery} img").first.bounding_box(), page.locator(gallery).bounding_box()
        assert picture["y"] + picture["height"] <= frame["y"] + frame["height"], (gallery, picture, frame)
    shot(page, "compose-2-result")

    page.locator("#compose-prompt textarea").fill("a photo of {0} on a beach")
    page.locator("#compose").click()
    # said at the prompt box before the run starts: the buttons never turn, the last result stays
    page.locator("#compose-prompt").get_by_text("must name each of the 2 people once").wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#compose").is_enabled() and not page.locator("#compose-interrupt").is_enabled()
    assert page.locator("#composed img").count() >= 1 and page.locator("#compose-regions img").count() >= 1
    assert page.get_by_text("Error", exact=True).count() == 0  # no output is marked as failed
    shot(page, "compose-3-bad-prompt")

    # naive composition places no one: the Regions choice greys out, and comes back with its choice
    page.locator("#compose-mode").get_by_label("naive").check()
    page.wait_for_function("() => document.querySelector('#compose-layout input[type=radio]')?.disabled === true")
    assert "no regions" in page.locator("#compose-layout").inner_text()
    shot(page, "compose-3b-naive")
    page.locator("#compose-mode").get_by_label("regions").check()
    page.wait_for_function("() => document.querySelector('#compose-layout input[type=radio]')?.disabled === false")
    assert page.get_by_label("Left / right").is_checked()

    # the mended prompt composes a new picture (3 steps: not the first one's, whose file the page
    # would show again under the same address), and its sentence goes
    shown = page.locator("#composed img").first.get_attribute("src")
    steps.fill("3")
    steps.press("Enter")
    page.locator("#compose-prompt textarea").fill("a photo of {0} and {1} on a beach")
    page.locator("#compose").click()
    page.wait_for_function("src => document.querySelector('#composed img')?.getAttribute('src') !== src", arg=shown,
                           timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('compose')?.disabled === false")
    assert page.locator("#compose-prompt").get_by_text("must name each").count() == 0


def test_a_long_composition_can_be_interrupted_and_the_tab_stays_usable(page, backbone, tmp_path):
    _open_with_two_concept_files(page, backbone, tmp_path, (23, 24))
    assert not page.locator("#compose-interrupt").is_enabled()  # nothing to interrupt yet
    steps = page.locator("#compose-steps input[type=number]")
    steps.fill("100")
    steps.press("Enter")
    page.locator("#compose").click()
    page.wait_for_function("() => document.getElementById('compose-interrupt')?.disabled === false")
    assert not page.locator("#compose").is_enabled()  # one composition at a time
    page.locator("#compose-interrupt").click()
    page.wait_for_function("() => (document.getElementById('compose-scores')?.innerText || '').includes('Interrupted after')")
    page.wait_for_function("() => document.getElementById('compose')?.disabled === false")
    assert not page.locator("#compose-interrupt").is_enabled()
    shot(page, "compose-4-interrupted")

    steps.fill("2")
    steps.press("Enter")
    page.locator("#compose").click()  # a past interrupt does not stop the next composition
    page.wait_for_function("() => (document.getElementById('compose-cost')?.innerText || '').includes('This run')")
    page.wait_for_selector("#composed img", timeout=TIMEOUT_MS)


def _stroke(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag the brush across the drawing canvas, from and to fractions of the white canvas."""
    box = page.locator("#compose-canvas .pixi-target canvas").bounding_box()
    # the canvas (the tiny preset's compose.aspect wide) sits in the middle of the editor, fitted at
    # the editor's zoom; measure it from the screen
    canvas_w, canvas_h = canvas_size(load_preset("tiny").compose.aspect)
    fit = min(box["width"] / canvas_w, box["height"] / canvas_h) * 0.82
    width, height = canvas_w * fit, canvas_h * fit
    left, top = box["x"] + (box["width"] - width) / 2, box["y"] + (box["height"] - height) / 2
    page.mouse.move(left + start[0] * width, top + start[1] * height)
    page.mouse.down()
    page.mouse.move(left + end[0] * width, top + end[1] * height, steps=10)
    page.mouse.up()


def test_regions_drawn_by_hand_place_each_person_where_their_colour_was_painted(page, backbone, tmp_path):
    _open_with_two_concept_files(page, backbone, tmp_path, (25, 26))
    assert not page.locator("#compose-drawing").is_visible()  # only for drawn regions
    page.get_by_label("Drawn by me").check()
    page.wait_for_selector("#compose-canvas canvas")
    steps = page.locator("#compose-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    _stroke(page, (0.2, 0.3), (0.25, 0.7))  # the brush starts red: person {0}, on the left
    page.locator("#compose").click()
    page.get_by_text("Nothing is drawn in blue for person {1}").first.wait_for(timeout=TIMEOUT_MS)
    shot(page, "compose-5-drawn-one-missing")

    page.locator("#compose-canvas button[aria-label=Color]").click()
    page.locator("#compose-canvas .swatch button.color").nth(1).click()  # blue: person {1}, on the right
    _stroke(page, (0.75, 0.3), (0.8, 0.7))
    page.locator("#compose").click()
    page.wait_for_selector("#compose-regions img", timeout=TIMEOUT_MS)
    shot(page, "compose-6-drawn")
    src = page.locator("#compose-regions img").first.get_attribute("src")
    overlay = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"), np.float32)
    width = overlay.shape[1]
    strips = {name: overlay[:, int(a * width):int(b * width)].reshape(-1, 3).mean(0)
              for name, (a, b) in {"left": (0.15, 0.28), "middle": (0.45, 0.55), "right": (0.72, 0.85)}.items()}
    red_minus_blue = {name: float(c[0] - c[2]) for name, c in strips.items()}
    # the overlay tints person {0} red, person {1} blue and the background grey
    assert red_minus_blue["left"] > red_minus_blue["middle"] + 30 > red_minus_blue["right"] + 60, red_minus_blue


def test_regions_can_be_drawn_on_a_phone(browser, studio_app):
    """At 390 x 844 the Compose tab is behind "More tabs"; the canvas fits the width and takes a stroke."""
    from test_browser_page import open_page

    page = open_page(browser, studio_app, 390, 844)
    try:
        page.wait_for_selector("#generate", state="attached")  # the tabs render after the top of the page
        assert not page.get_by_role("tab", name="Compose").is_visible()
        page.get_by_role("button", name="More tabs").click()
        page.locator(".overflow-dropdown button", has_text="Compose").click()
        page.get_by_label("Drawn by me").check()
        page.wait_for_selector("#compose-canvas canvas")
        page.locator("#compose-canvas").scroll_into_view_if_needed()
        box = page.locator("#compose-canvas").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        _stroke(page, (0.3, 0.3), (0.35, 0.7))
        shot(page, "compose-7-drawn-on-a-phone")
        page.locator("#compose").click()
        # the red stroke arrived (no "Nothing is drawn:" for the whole canvas): only blue is missing
        page.get_by_text("Nothing is drawn in blue for person {1}").first.wait_for(timeout=TIMEOUT_MS)
    finally:
        page.context.close()
