"""The Compose tab in a browser (headless chromium): two concept files side by side, then a bad prompt.

Screenshots go to test-output/browser/ (compose-*.png) — look at them after a change to the tab.
"""
from __future__ import annotations

import pytest

from studio.concept_file import save_concept
from test_browser import TIMEOUT_MS, browser, page, shot  # noqa: F401  (fixtures)
from test_sampler import make_concept

pytestmark = pytest.mark.browser


def test_compose_two_concept_files_left_and_right_then_a_prompt_that_names_one(page, backbone, tmp_path):
    files = [save_concept(make_concept(backbone, seed=s), tmp_path / f"p{s}.safetensors") for s in (21, 22)]
    page.get_by_role("tab", name="Compose").click()
    for index, path in enumerate(files):
        page.locator(f"#compose-kind-{index}").get_by_label("A concept file").check()
        page.set_input_files(f"#compose-file-{index} input[type=file]", str(path))
    page.get_by_label("Left / right").check()
    steps = page.locator("#compose-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    shot(page, "compose-1-filled")
    page.locator("#compose").click()
    page.wait_for_selector("#composed img", timeout=TIMEOUT_MS)
    page.wait_for_selector("#compose-regions img", timeout=TIMEOUT_MS)
    page.wait_for_function("() => (document.querySelector('#compose-cost')?.innerText || '').includes('This run')")
    assert "This run: 1 UNet pass per step" in page.locator("#compose-cost").inner_text()
    assert "UNet pass" not in page.locator("#compose-scores").inner_text()  # the cost is said once
    shot(page, "compose-2-result")

    page.locator("#compose-prompt textarea").fill("a photo of {0} on a beach")
    page.locator("#compose").click()
    page.get_by_text("must name each of the 2 people once").first.wait_for(timeout=TIMEOUT_MS)
    shot(page, "compose-3-bad-prompt")


def test_a_long_composition_can_be_interrupted_and_the_tab_stays_usable(page, backbone, tmp_path):
    files = [save_concept(make_concept(backbone, seed=s), tmp_path / f"p{s}.safetensors") for s in (23, 24)]
    page.get_by_role("tab", name="Compose").click()
    assert not page.locator("#compose-interrupt").is_enabled()  # nothing to interrupt yet
    for index, path in enumerate(files):
        page.locator(f"#compose-kind-{index}").get_by_label("A concept file").check()
        page.set_input_files(f"#compose-file-{index} input[type=file]", str(path))
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
