"""The page follows the user: each test is a defect found in a real browser,
reproduced in Debian's chromium and checked after the fix.

Screenshots go to test-output/browser/ (page-*.png): look at them after a change to the layout.
"""
from __future__ import annotations

import re
import zipfile

import pytest
from PIL import Image

from studio.concept_file import save_concept
from test_browser import CHROMIUM_ARGS, SHOTS, TIMEOUT_MS, browser, set_number, upload_photo, wait_for_status  # noqa: F401
from test_sampler import make_concept

pytestmark = pytest.mark.browser


def open_page(browser, studio_app, width: int = 1400, height: int = 1000):
    _demo, url = studio_app
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#train")
    return page


@pytest.fixture
def page(browser, studio_app):
    page = open_page(browser, studio_app)
    yield page
    page.context.close()


def enabled(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").is_enabled()


def wait_enabled(page, elem_id: str, state: bool = True) -> None:
    page.wait_for_function(
        "([id, state]) => { const b = document.getElementById(id); return b && b.disabled === !state; }",
        arg=[elem_id, state], timeout=TIMEOUT_MS,
    )


def status(page) -> str:
    return page.locator("#status").inner_text()


def wait_for_text(page, elem_id: str, text: str) -> None:
    page.wait_for_function(
        "([id, t]) => (document.getElementById(id)?.innerText || '').includes(t)", arg=[elem_id, text], timeout=TIMEOUT_MS
    )


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"page-{name}.png"))


def train_briefly(page, faces_dir) -> None:
    """Upload a selfie and train 2 steps on tiny, until the previews are shown."""
    upload_photo(page, str(faces_dir / "single" / "f2d_2.jpg"))
    wait_enabled(page, "train")
    set_number(page, "steps", 2)
    page.click("#train")
    wait_for_status(page, "Finished")
    page.wait_for_selector("#previews img")


def start_long_generation(page) -> None:
    """Start 8 images of 100 steps at 256 px on the Create images tab (long on tiny), until it runs."""
    set_number(page, "gen-steps", 100)
    set_number(page, "num-images", 8)
    set_number(page, "gen-width", 256)
    set_number(page, "gen-height", 256)
    page.click("#generate")
    wait_enabled(page, "interrupt")


def test_clearing_the_photo_box_forgets_the_photos(page, faces_dir, studio_app):
    upload_photo(page, str(faces_dir / "single" / "f2d_2.jpg"))
    page.wait_for_selector("#crops img")
    wait_enabled(page, "train")
    assert "Ready to train" in status(page) and "add a photo" not in status(page)
    page.locator("#photos button[aria-label*='lear' i]").first.click()  # the upload box's ✕
    page.wait_for_function("() => !document.querySelector('#crops img')")
    wait_enabled(page, "train", False)
    wait_for_text(page, "status", "add a photo")
    demo, _url = studio_app
    engines = [demo.sessions.get(key) for key in demo.sessions.sessions()]
    assert all(e.snapshot().prepared is None for e in engines if e.snapshot().photo_pool is None)
    assert not any(e.snapshot().prepared for e in engines), "no session still holds the removed photos"


def test_the_buttons_follow_the_phase_and_the_text_is_never_stale(page, faces_dir):
    for button in ("train", "continue", "pause", "resume", "stop", "preview-now"):
        assert not enabled(page, button), f"{button} before any photo"
    upload_photo(page, str(faces_dir / "single" / "f2d_2.jpg"))
    wait_enabled(page, "train")
    assert not enabled(page, "continue") and not enabled(page, "pause")
    set_number(page, "steps", 3000)
    page.click("#train")
    wait_for_text(page, "status", "Training")
    wait_enabled(page, "pause")
    assert not enabled(page, "train") and not enabled(page, "continue") and enabled(page, "stop")
    page.click("#pause")
    wait_enabled(page, "resume")
    wait_for_text(page, "status", "Paused")
    assert "ETA" not in status(page), "no ETA while paused"
    assert not enabled(page, "pause")
    shot(page, "paused")
    page.click("#resume")
    wait_enabled(page, "pause")
    wait_for_text(page, "status", "loss ")  # a step has been made since
    page.click("#stop")
    wait_for_text(page, "status", "Stopped")
    wait_enabled(page, "train")
    wait_enabled(page, "continue")
    assert "Train more goes on from here" in status(page)
    assert not enabled(page, "pause") and not enabled(page, "stop")
    # other photos: Train more cannot go on, and the status no longer says it can
    upload_photo(page, str(faces_dir / "single" / "f2d_3.jpg"))
    wait_enabled(page, "continue", False)
    assert "Train more goes on from here" not in status(page)


def slider_events(page) -> list[dict]:
    """The events the page's config wires to the trade-off sliders' moves: for each, the triggers
    and the elem_ids of the components it sends back (what Gradio marks pending and updates)."""
    config = page.request.get(page.url.split("?")[0].rstrip("/") + "/config").json()
    elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    sliders = {i for i, name in elem_ids.items() if name in ("band-lo", "band-hi", "balance")}
    moves = ("input", "change", "release")
    return [{"triggers": [(elem_ids[t], event) for t, event in dep["targets"]],
             "outputs": [elem_ids.get(o) for o in dep["outputs"]]}
            for dep in config["dependencies"]
            if any(t in sliders and event in moves for t, event in dep["targets"])]


def test_keyboard_slider_changes_rerender_the_previews(page, faces_dir):
    # what a slider move may send back: the previews alone, never the loss plot or the status
    events = slider_events(page)
    assert events, "the sliders' moves are wired"
    for event in events:
        assert event["outputs"] == ["previews"], f"a slider move resends more than the previews: {event}"
    train_briefly(page, faces_dir)
    # watch the live view: the plot's drawing must stay (not be resent) and no progress overlay may cover it
    page.evaluate("""() => {
        document.querySelector('#loss-plot svg').dataset.kept = 'yes';
        window.overlaid = [];
        new MutationObserver((changes) => changes.forEach((c) => {
            const el = c.target;
            if (el.classList && el.classList.contains('translucent'))  // the overlay that hides what is under it
                window.overlaid.push(el.closest('[id]')?.id || el.className);
        })).observe(document.querySelector('#live'), {attributes: true, subtree: true, attributeFilter: ['class']});
    }""")
    slider = page.locator("#band-lo input[type=range]")
    slider.focus()
    for _ in range(5):
        slider.press("ArrowRight")
    wait_for_text(page, "previews", "t∈[405, 800]")
    box = page.locator("#balance input[type=number]")
    box.fill("2.5")
    box.press("Tab")
    wait_for_text(page, "previews", "γ=2.5")
    # the page numbered every change as it sent it (the server orders changes by that number)
    assert page.evaluate("() => window.studioSliderClock") >= 6, "five key presses and a typed value"
    plot_paths = page.locator("#loss-plot g.mark-line path").count()
    assert plot_paths == 2, "the loss plot is still drawn after the re-render"
    assert page.evaluate("() => document.querySelector('#loss-plot svg')?.dataset.kept") == "yes", "plot not resent"
    assert page.evaluate("() => window.overlaid") == [], "no progress overlay over the live view"


def test_a_too_small_face_is_told_the_minimum_size(page, faces_dir, tmp_path):
    face = Image.open(faces_dir / "scarletthead_woman" / "scarlett_0.jpg").convert("RGB").resize((40, 40))
    canvas = Image.new("RGB", (640, 480), (120, 130, 140))
    canvas.paste(face, (200, 120))
    canvas.save(tmp_path / "far-away.png")
    upload_photo(page, str(tmp_path / "far-away.png"))
    wait_for_text(page, "photo-report", "✗")
    report = page.locator("#photo-report").inner_text()
    assert "too small" in report and "64 pixels" in report and "sunglasses" not in report, report


def test_another_person_is_marked_and_left_out_by_default(page, faces_dir, studio_app):
    photos = [str(faces_dir / "scarletthead_woman" / name) for name in ("scarlett_0.jpg", "scarlett_1.jpg")]
    photos.append(str(faces_dir / "newton_man" / "newton_0.jpg"))
    upload_photo(page, photos)
    page.wait_for_selector("#photo-choice input[type=checkbox]")
    boxes = page.locator("#photo-choice label")
    labels = boxes.all_inner_texts()
    assert any("newton_0.jpg" in text and "another person" in text for text in labels), labels
    newton = page.locator("#photo-choice label", has_text="newton_0.jpg").locator("input")
    assert not newton.is_checked(), "left out by default"
    assert all(page.locator("#photo-choice label", has_text=n).locator("input").is_checked()
               for n in ("scarlett_0.jpg", "scarlett_1.jpg"))
    assert "⚠ newton_0.jpg" in page.locator("#photo-report").inner_text()
    wait_for_text(page, "crops", "may be another person")
    demo, _url = studio_app
    used = [{p.name for p in demo.sessions.get(k).snapshot().prepared.photos} for k in demo.sessions.sessions()
            if demo.sessions.get(k).snapshot().prepared is not None]
    assert {"scarlett_0.jpg", "scarlett_1.jpg"} in used
    shot(page, "other-person")
    newton.check()  # one click keeps it
    page.wait_for_function(
        "() => [...document.querySelectorAll('#crops')].some(g => !g.innerText.includes('left out'))"
    )
    used = [{p.name for p in demo.sessions.get(k).snapshot().prepared.photos} for k in demo.sessions.sessions()
            if demo.sessions.get(k).snapshot().prepared is not None]
    assert {"scarlett_0.jpg", "scarlett_1.jpg", "newton_0.jpg"} in used


@pytest.mark.parametrize("size", [(1366, 768), (1400, 1000), (1920, 1080)])
def test_commands_and_live_view_are_visible_together(browser, studio_app, faces_dir, size):
    page = open_page(browser, studio_app, *size)
    try:
        train_briefly(page, faces_dir)
        page.click("#advanced")  # the user opens the settings and scrolls down to them
        page.mouse.move(size[0] * 0.2, size[1] * 0.5)
        page.mouse.wheel(0, 500)
        page.wait_for_function("() => window.scrollY > 100")
        width, height = size
        # Gradio's columns wrap their children: on a 768 px window the height-capped panel once put
        # the previews in a second column, off the right of the window
        overflow = page.evaluate("() => { const l = document.getElementById('live'); return l.scrollWidth - l.clientWidth; }")
        assert overflow <= 1, f"the live panel scrolls sideways by {overflow} px at {size}"
        live, previews = page.locator("#live").bounding_box(), page.locator("#previews").bounding_box()
        assert live["x"] <= previews["x"] and previews["x"] + previews["width"] <= min(width, live["x"] + live["width"] + 1)
        in_view = ("train", "stop", "status", "loss-plot", "band-lo", "balance") if height >= 1000 else ("train", "stop", "status")
        for elem_id in in_view:
            box = page.locator(f"#{elem_id}").bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= height, f"{elem_id} off-screen at {size}: {box}"
        if height < 1000:  # a laptop screen: the previews may be a scroll of the live panel away
            page.locator("#previews").scroll_into_view_if_needed()
            previews = page.locator("#previews").bounding_box()
        assert previews["y"] >= 0 and previews["y"] + 150 <= height, f"previews off-screen at {size}: {previews}"
        shot(page, f"layout-{size[0]}x{size[1]}")
    finally:
        page.context.close()


def test_generate_like_a1111(page, faces_dir, tmp_path):
    page.wait_for_selector("#generate")  # the tabs render after the top of the page
    assert page.get_by_role("button", name="Generate", exact=True).count() == 1
    assert page.get_by_role("tab", name="Generate", exact=True).count() == 0, "a tab and a button share the name"
    train_briefly(page, faces_dir)
    page.get_by_role("tab", name="Create images").click()
    assert page.locator("#gen-seed input").input_value() == "-1"
    set_number(page, "gen-seed", 7)
    page.click("#random-seed")
    page.wait_for_function("() => document.querySelector('#gen-seed input').value === '-1'")
    set_number(page, "gen-steps", 2)
    set_number(page, "num-images", 2)
    set_number(page, "gen-width", 100)  # rounded to the model's multiple: 96 on tiny
    page.click("#generate")
    page.wait_for_selector("#download-all a")
    caption = page.locator("#generated").inner_text()
    assert "training step 2" in caption, caption
    with page.expect_download() as download:
        page.locator("#download-all a").first.click()
    archive = tmp_path / "all.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as images:
        names = images.namelist()
        assert len(names) == 2
        images.extract(names[0], tmp_path)
    png = Image.open(tmp_path / names[0])
    assert png.size == (96, 64)
    parameters = png.text["parameters"]
    assert parameters.startswith("a photo of {} as an astronaut on the moon")
    assert "Steps: 2" in parameters and "Size: 96x64" in parameters and "Seed: " in parameters
    seed = int(parameters.split("Seed: ")[1].split(",")[0])
    assert seed != -1
    shot(page, "generated")

    # a long generation can be interrupted; Generate is off while it runs
    start_long_generation(page)
    assert not enabled(page, "generate")
    page.click("#interrupt")
    page.wait_for_function("t => document.body.innerText.includes(t)", arg="Interrupted", timeout=TIMEOUT_MS)
    wait_enabled(page, "generate")

    # a prompt without {} says where the person goes, in words, at the prompt box, before any
    # work: the buttons never turn and the gallery keeps its images, none marked as failed
    shown = page.locator("#generated img").count()
    page.locator("#prompt textarea").fill("a photo of a woman on the beach")
    page.click("#generate")
    page.locator("#prompt").get_by_text("in place of words").wait_for(timeout=TIMEOUT_MS)
    assert enabled(page, "generate") and not enabled(page, "interrupt")
    assert shown >= 1 and page.locator("#generated img").count() == shown
    assert page.get_by_text("Error", exact=True).count() == 0
    shot(page, "generate-bad-prompt")


def wait_for_page_text(page, text: str) -> None:
    page.wait_for_function("t => document.body.innerText.includes(t)", arg=text, timeout=TIMEOUT_MS)


def test_words_names_and_focus_are_for_people(page, faces_dir):
    slider = page.locator("#balance input[type=range]")
    slider.focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Shift+Tab")  # focus by keyboard, so :focus-visible applies
    outline = slider.evaluate("el => getComputedStyle(el).outlineStyle")
    assert outline not in ("none", ""), outline
    margin = page.locator(".help p").first.evaluate("el => parseFloat(getComputedStyle(el).marginTop)")
    assert margin >= 0, "help text is not pulled under the control above it"
    upload_photo(page, str(faces_dir / "single" / "f2d_2.jpg"))
    wait_enabled(page, "train")
    # the upload box's own buttons (add more, clear) have names for people, not i18n keys
    assert page.locator('[aria-label^="common."]').count() == 0
    assert page.locator("#photos").get_by_role("button", name="Upload files").count() >= 1
    page.click("#advanced")
    band = page.locator("#advanced input[type=number]")
    start = page.get_by_label("Training band start t")
    start.fill("900")
    start.press("Tab")
    page.get_by_label("Training band end t").fill("400")
    page.get_by_label("Training band end t").press("Tab")
    assert band.count() >= 2
    page.click("#train")
    wait_for_page_text(page, "must start before it ends")
    assert "<=" not in page.locator("body").inner_text()
    shot(page, "band-error")


def test_a_failed_import_is_not_still_shown_after_a_good_one(page, backbone, tmp_path):
    good = save_concept(make_concept(backbone, seed=31), tmp_path / "good.safetensors")
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00" * 8 + b"not json at all")
    page.get_by_role("tab", name="Concept file").click()
    page.set_input_files("#import input[type=file]", str(corrupt))
    wait_for_text(page, "concept-msg", "✗")
    error = page.locator("#concept-msg").inner_text().strip()
    page.locator("#import button[aria-label*='lear' i]").first.click()  # the box's ✕, to choose another file
    # the error was about the file just removed: it goes with it, before the next file is chosen
    page.wait_for_function("() => !(document.getElementById('concept-msg')?.innerText || '').includes('✗')")
    page.set_input_files("#import input[type=file]", str(good))
    wait_for_text(page, "concept-msg", "Loaded")
    message = page.locator("#concept-msg").inner_text()
    assert "✗" not in message and error.lstrip("✗ ")[:40] not in message, f"the earlier error is still shown: {message}"
    shot(page, "import-after-error")


def test_several_warnings_read_as_sentences(page, faces_dir, tmp_path):
    # one black-and-white photo with two people: two warnings for the same photo
    woman = Image.open(faces_dir / "scarletthead_woman" / "scarlett_0.jpg").convert("RGB")
    man = Image.open(faces_dir / "newton_man" / "newton_0.jpg").convert("RGB")
    man = man.resize((man.width * 2 // 3, man.height * 2 // 3))
    canvas = Image.new("RGB", (woman.width + man.width, max(woman.height, man.height)), (128, 128, 128))
    canvas.paste(woman, (0, 0))
    canvas.paste(man, (woman.width, 0))
    canvas.convert("L").save(tmp_path / "two-people-bw.png")
    upload_photo(page, str(tmp_path / "two-people-bw.png"))
    wait_for_text(page, "photo-report", "two-people-bw.png")
    line = next(text for text in page.locator("#photo-report").inner_text().splitlines() if "two-people-bw.png" in text)
    assert "black-and-white" in line and "Found 2 faces" in line, line
    assert ".;" not in line and "; Found" not in line, line
    # each warning is its own sentence: one ends with a full stop, the next begins after a space
    first, second = sorted((line.index("This is a black-and-white"), line.index("Found 2 faces")))
    between = line[first:second]
    assert between.rstrip().endswith(".") and between[len(between.rstrip()):] == " ", line


def test_a_cpu_server_never_says_it_waits_for_the_gpu(browser, studio_app, faces_dir):
    # one session holds the accelerator gate with a long generation; another asks to train meanwhile
    busy, waiting = open_page(browser, studio_app), open_page(browser, studio_app)
    try:
        train_briefly(busy, faces_dir)
        upload_photo(waiting, str(faces_dir / "single" / "f2d_3.jpg"))
        wait_enabled(waiting, "train")
        set_number(waiting, "steps", 2)
        busy.get_by_role("tab", name="Create images").click()
        start_long_generation(busy)
        waiting.click("#train")
        wait_for_text(waiting, "status", "ahead in line")
        said = status(waiting)
        shot(waiting, "waiting-in-line")
        assert "GPU" not in said, f"a CPU server says: {said}"
        busy.click("#interrupt")
        wait_for_text(waiting, "status", "Finished")
    finally:
        busy.context.close()
        waiting.context.close()


def test_the_best_step_button_goes_back_to_the_best_balanced_step(page, faces_dir):
    upload_photo(page, str(faces_dir / "single" / "f2d_2.jpg"))
    wait_enabled(page, "train")
    set_number(page, "steps", 3000)
    page.click("#train")
    wait_for_text(page, "status", "Best balance so far: step")  # a scored training preview (tiny: every 25 steps)
    wait_enabled(page, "best-step", False)  # not while training
    page.click("#stop")
    wait_for_text(page, "status", "Stopped")
    wait_enabled(page, "best-step")
    best = int(status(page).split("Best balance so far: step ")[1].split(" ")[0])
    stopped_at = int(status(page).split("step ")[1].split(" /")[0])
    page.click("#best-step")
    wait_for_text(page, "status", f"Using the concept of step {best}")
    wait_for_text(page, "previews", f"step {best} ·")
    captions = page.locator("#previews").inner_text()
    shown = re.findall(r"step (\d+) ·", captions)
    assert shown and all(int(step) == best for step in shown), captions
    assert "Train more still goes on from the end of the run" in status(page), status(page)
    shot(page, f"best-step-{best}-of-{stopped_at}")


def test_a_sample_photo_still_works_for_the_next_visitor_after_the_first_has_left(browser, studio_app):
    """Every visitor who clicks a sample is handed Gradio's one cached copy of it: the first
    visitor's session, closing, must not delete it."""
    demo, _url = studio_app
    before = set(demo.sessions.sessions())
    first = open_page(browser, studio_app)
    first.get_by_text("astronaut.png").first.click()
    first.wait_for_selector("#crops img")
    mine = set(demo.sessions.sessions()) - before
    assert mine, "the click opened a session"
    first.context.close()  # the visitor leaves: the page unloads and the session closes
    assert demo.sessions.wait_until(lambda keys: not mine & set(keys), timeout=TIMEOUT_MS / 1000), "the session closed"
    second = open_page(browser, studio_app)
    try:
        second.get_by_text("astronaut.png").first.click()
        second.wait_for_function("() => (document.getElementById('photo-report')?.innerText || '').includes('astronaut.png')")
        assert "✗" not in second.locator("#photo-report").inner_text(), second.locator("#photo-report").inner_text()
        second.wait_for_selector("#crops img")
    finally:
        second.context.close()
