"""The page's pure parts (training form spec, snapshot views, explore helpers) and the engine
commands behind the page (photo choice, clearing, Train more after a photo change,
interrupting a generation, slider values in exported concepts)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from studio.engine import Engine, Phase, Snapshot
from studio.sampler import GenerationInterrupted
from studio.metrics import IdentityScore, ImageScores, PromptScore
from studio.sweep import SweepSnapshot, summarise
from studio.ui import explore, form, views
from studio.ui import app as ui_app
from studio.ui.app import Handlers
from studio.ui.sessions import SessionRegistry

TIMEOUT = 300


# ----------------------------------------------------------------------------- sliders
def test_a_slider_change_that_arrives_after_a_newer_one_is_never_rendered(monkeypatch, tiny_cfg, tmp_path):
    """The requests of one drag can reach the server out of order; the page numbers them."""
    monkeypatch.setattr(ui_app, "SLIDER_DEBOUNCE_S", 0.0)
    sessions = SessionRegistry(tiny_cfg, root=tmp_path)
    handlers = Handlers(sessions, chunked=False)
    rendered = []
    monkeypatch.setattr(handlers, "on_slider", lambda lo, hi, gamma, request: rendered.append((lo, hi, gamma)) or "shown")
    request = SimpleNamespace(session_hash="one tab")

    async def a_drag_whose_requests_cross():
        # tasks start in the order made: the newer change reaches the server first
        newer = asyncio.create_task(handlers.on_slider_input(120, 800, 1.0, 7, request))
        older = asyncio.create_task(handlers.on_slider_input(300, 800, 1.0, 6, request))
        return await asyncio.gather(newer, older)

    newer, older = asyncio.run(a_drag_whose_requests_cross())
    assert (newer, rendered) == ("shown", [(120, 800, 1.0)])
    assert isinstance(older, type(gr.skip())), "the older change leaves the previews alone"

    # a burst renders once, its last change; a call without a number (HTTP API) is the newest
    async def a_burst():
        return await asyncio.gather(*(handlers.on_slider_input(lo, 800, 1.0, None, request) for lo in (10, 20, 30)))

    rendered.clear()
    assert asyncio.run(a_burst())[-1] == "shown" and rendered == [(30, 800, 1.0)]

    # a change still waiting out its pause gives way to previews something else sets meanwhile
    async def a_change_then_best_step():
        arrived, resume = asyncio.Event(), asyncio.Event()

        async def pause():
            arrived.set()
            await resume.wait()

        handlers._burst_pause = pause
        change = asyncio.create_task(handlers.on_slider_input(50, 800, 1.0, 99, request))
        await arrived.wait()
        handlers.on_previews_set(600, 900, 0.75, request)  # e.g. Best step's values
        resume.set()
        return await change

    rendered.clear()
    assert isinstance(asyncio.run(a_change_then_best_step()), type(gr.skip()))
    assert rendered == [(600, 900, 0.75)]
    del handlers._burst_pause

    # what a session left is forgotten when it closes, however it closes (unload or idle)
    asyncio.run(handlers.on_slider_input(40, 800, 1.0, 1, SimpleNamespace(session_hash="another tab")))
    sessions.close("one tab")
    assert list(handlers._slider_lines) == ["another tab"]


def test_train_and_train_more_touch_sessions_and_engines_off_the_event_loop(tiny_cfg, tmp_path):
    """The server's one event loop serves every page: a session lookup (which may close idle
    sessions, joining their threads) or an engine start waiting on a lock must run elsewhere."""
    loop_threads, calls = [], []

    class Recorder:
        """Every engine and registry method records the thread it was called on."""

        def __init__(self, target):
            self._target = target

        def __getattr__(self, name):
            attr = getattr(self._target, name)
            if not callable(attr):
                return attr

            def recorded(*args, **kwargs):
                calls.append((name, threading.current_thread()))
                result = attr(*args, **kwargs)
                return Recorder(result) if isinstance(result, Engine) else result
            return recorded

    handlers = Handlers(Recorder(SessionRegistry(tiny_cfg, root=tmp_path)), chunked=False)
    request = SimpleNamespace(session_hash="one tab")
    steps = views.as_number(1, "steps")
    band_and_balance = (tiny_cfg.sample.band[0], tiny_cfg.sample.band[1], tiny_cfg.sample.balance)

    async def press(handler, *values):
        loop_threads.append(threading.current_thread())
        with pytest.raises(gr.Error, match="photo|no training"):  # nothing to train yet: refused in words
            async for _ in handler(request, *values):
                pass

    training_form = form.values_from(form.TRAINING_FORM, tiny_cfg)
    calls.clear()  # from here on, only what the presses call
    asyncio.run(press(handlers.on_train, *training_form, *band_and_balance))
    asyncio.run(press(handlers.on_continue, steps, *band_and_balance))
    names = {name for name, _ in calls}
    assert {"get", "set_preview_settings", "start", "continue_training"} <= names, names
    on_the_loop = [name for name, thread in calls if thread in loop_threads]
    assert not on_the_loop, f"called on the event loop: {on_the_loop}"


# ----------------------------------------------------------------------------- form
def test_the_form_spec_fills_from_a_preset_and_reads_back_the_same_overrides(tiny_cfg):
    values = form.values_from(form.TRAINING_FORM, tiny_cfg)
    overrides = form.overrides(form.TRAINING_FORM, values)
    assert overrides["train.band"] == list(tiny_cfg.train.band)
    assert tiny_cfg.replace(**overrides) == tiny_cfg, "reading the filled form changes nothing"
    changed = list(values)
    changed[0] = 17
    assert tiny_cfg.replace(**form.overrides(form.TRAINING_FORM, changed)).train.steps == 17


def test_the_form_names_emptied_fields_and_says_the_band_rule_in_words(tiny_cfg):
    values = form.values_from(form.TRAINING_FORM, tiny_cfg)
    labels = [field.label for field in form.TRAINING_FORM]
    emptied = list(values)
    emptied[labels.index("Learning rate")] = None
    with pytest.raises(gr.Error, match="Fill in Learning rate"):
        form.overrides(form.TRAINING_FORM, emptied)
    reversed_band = list(values)
    reversed_band[labels.index("Training band start t")] = 900
    reversed_band[labels.index("Training band end t")] = 400
    with pytest.raises(gr.Error) as raised:
        form.overrides(form.TRAINING_FORM, reversed_band)
    assert "must start before it ends" in raised.value.message and "<=" not in raised.value.message


# ----------------------------------------------------------------------------- views
@pytest.mark.parametrize("phase, allowed", [
    (Phase.TRAINING, {"pause", "stop", "preview"}),
    (Phase.PAUSED, {"resume", "stop", "preview"}),
    (Phase.LOADING, {"stop"}),
    (Phase.FINISHED, {"train", "continue", "preview"}),
])
def test_the_buttons_allowed_follow_the_phase(phase, allowed):
    photos = type("Prepared", (), {"photos": ("a",)})()
    snapshot = Snapshot(version=1, phase=phase, prepared=photos, concept=object(), can_continue=True)
    assert {name for name, ok in views.controls(snapshot).items() if ok} == allowed


@pytest.mark.parametrize("phase", [Phase.TRAINING, Phase.PAUSED])
def test_a_first_run_can_be_previewed_from_its_live_weights_before_any_concept(phase):
    photos = type("Prepared", (), {"photos": ("a",)})()
    live = Snapshot(version=1, phase=phase, prepared=photos, live_weights=True)
    assert views.controls(live)["preview"]
    assert not views.controls(replace(live, live_weights=False))["preview"], "ZeroGPU: nothing to preview until a chunk ends"
    assert not views.controls(replace(live, phase=Phase.FINISHED))["preview"]


def test_nothing_is_allowed_but_adding_photos_at_first_and_train_once_there_are_some():
    assert not any(views.controls(Snapshot(version=0, phase=Phase.IDLE)).values())
    photos = type("Prepared", (), {"photos": ("a",)})()
    ready = Snapshot(version=1, phase=Phase.IDLE, prepared=photos)
    assert {name for name, ok in views.controls(ready).items() if ok} == {"train"}
    assert views.status_markdown(ready).startswith("**Ready to train**")
    assert "add a photo" not in views.status_markdown(ready)


def test_a_paused_run_shows_no_eta_and_the_queue_is_not_called_a_gpu():
    paused = Snapshot(version=3, phase=Phase.PAUSED, step=5, total=50, steps_per_second=2.0, eta_seconds=22.5,
                      queue_position=2)
    text = views.status_markdown(paused)
    assert "ETA" not in text and "GPU" not in text and "2 ahead" in text
    assert "ETA 22s" in views.status_markdown(replace(paused, phase=Phase.TRAINING))


def test_a_checked_first_step_sends_only_the_checked_input_and_says_a_refusal_at_it():
    from studio.conditioning import check_prompt

    with gr.Blocks() as demo:
        prompt, other = gr.Textbox(), gr.Textbox()
        run, stop = gr.Button(), gr.Button()
        views.start_checked(run, {prompt: check_prompt}, [run, stop], starts=1)
    step = next(fn for fn in demo.fns.values() if fn.validator is not None)
    assert [block._id for block in step.inputs] == [prompt._id], "only the checked input is sent"
    assert step.queue and step.concurrency_limit is None, "Gradio checks inputs on queued events only"
    refused = step.validator("a photo of a woman")
    assert refused == gr.validate(False, "The prompt has no {} for the person: put {} where the person goes, in place "
                                         "of words such as 'a woman' or 'me' (e.g. 'a photo of {} on the beach').")
    assert step.validator("a photo of {} on the beach") == gr.validate(True, "")
    assert step.fn("ignored") == [gr.update(interactive=False), gr.update(interactive=True)]  # the run's buttons turn
    assert other not in step.inputs


def test_saved_images_carry_a1111_parameters_and_the_training_step(tmp_path):
    setting = dict(prompt="a photo of {} in a garden", negative_prompt="blurry", seed=42, num_inference_steps=3,
                   scheduler="ddim", guidance_scale=7.5, band=(400, 800), balance=1.5, identity_steps=2, total_steps=3)
    result = type("Result", (), {"images": [Image.new("RGB", (72, 64))], "captions": ["garden · seed 42"],
                                 "settings": [setting]})()
    [(path, caption)] = views.generated_items(result, 120, tmp_path, model="tiny")
    assert "training step 120" in caption
    text = Image.open(path).text["parameters"]
    assert text.splitlines()[0] == "a photo of {} in a garden"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 72x64" in text
    archive = views.zip_of([path], tmp_path)
    import zipfile

    assert zipfile.ZipFile(archive).namelist() == [path.rsplit("/", 1)[1]]


# ----------------------------------------------------------------------------- explore
def _point(band, balance, prompt) -> SweepPoint:
    """A setting whose two images have no face and this prompt score."""
    scores = [ImageScores(IdentityScore(None, False, "dlib"), PromptScore(prompt, "tiny-clip")) for _ in range(2)]
    return summarise(band, balance, [Image.new("RGB", (8, 8))] * 2, scores)


def test_equal_points_are_one_dot_naming_every_setting_and_the_summary_says_tie():
    points = [_point((200, 800), 1.0, 21.0), _point((400, 800), 1.0, 21.0), _point((400, 800), 2.0, 18.0)]
    frame = explore.scatter_frame(points)
    drawn = frame.dropna()
    assert len(drawn) == 2, "the two equal settings are one dot"
    assert any(" = " in setting for setting in drawn["setting"])
    run = SweepSnapshot(bands=((200, 800), (400, 800)), balances=(1.0, 2.0), prompts=("a photo of {}",), seeds=(0,),
                        steps=2, references=0, random_backbone=True, points=tuple(points))
    summary = explore.summary_markdown(run)
    assert summary.startswith("**Tie**") and points[1].label in summary
    # the sentence names the row the table stars
    starred = explore.results_table(points).set_index(explore.TABLE_HEADERS[1]).iloc[:, 0]
    [marked] = [label for label, mark in starred.items() if mark == "★"]
    assert f"{marked} is marked ★" in summary


# ----------------------------------------------------------------------------- engine commands
@pytest.fixture
def engine(tiny_cfg, backbone):
    cfg = tiny_cfg.replace(**{"train.steps": 2, "train.preview_every": 0})
    engine = Engine(cfg, session_id=f"page-{threading.get_ident()}")
    yield engine
    engine.close()


def test_another_person_is_left_out_until_chosen_and_clearing_forgets_all(engine, faces_dir):
    people = [faces_dir / "scarletthead_woman" / "scarlett_0.jpg", faces_dir / "scarletthead_woman" / "scarlett_1.jpg",
              faces_dir / "newton_man" / "newton_0.jpg"]
    pool = engine.prepare_photos([str(p) for p in people])
    assert [pool.photos[i].name for i in pool.outliers] == ["newton_0.jpg"]
    assert [p.name for p in engine.snapshot().prepared.photos] == ["scarlett_0.jpg", "scarlett_1.jpg"]
    engine.choose_photos(["scarlett_0.jpg", "scarlett_1.jpg", "newton_0.jpg"])
    assert len(engine.snapshot().prepared.photos) == 3
    assert engine.snapshot().prepared.outliers == (2,)
    with pytest.raises(ValueError, match="at least one"):
        engine.choose_photos([])
    engine.clear_photos()
    assert engine.snapshot().prepared is None
    with pytest.raises(ValueError, match="Add at least one photo"):
        engine.start()


def test_the_photo_report_says_whether_each_odd_photo_is_trained_on(engine, faces_dir):
    """Two people, one photo each: both are flagged and, since neither is the odd one out, both
    are trained on; the report says so, and says "left out" once one is unticked."""
    pool = engine.prepare_photos([str(faces_dir / "scarletthead_woman" / "scarlett_0.jpg"),
                                  str(faces_dir / "newton_man" / "newton_0.jpg")])
    assert len(pool.outliers) == 2 and len(engine.snapshot().prepared.photos) == 2
    head, *lines = views.photo_report(pool, engine.snapshot().prepared).splitlines()
    assert all("trained on" in line and "left out of training" not in line for line in lines), lines
    assert all("different person from the other photo" in line for line in lines), lines
    assert head.endswith("2 of 2 photos usable")
    engine.choose_photos(["scarlett_0.jpg"])
    head, scarlett, newton = views.photo_report(pool, engine.snapshot().prepared).splitlines()
    assert "trained on" in scarlett and "left out of training unless you tick it" in newton
    assert head.endswith("2 of 2 photos usable · 1 trained on")


def test_train_more_is_offered_only_for_the_photos_it_was_trained_on(engine, faces_dir):
    first, other = str(faces_dir / "single" / "f2d_0.jpg"), str(faces_dir / "single" / "f2d_1.jpg")
    engine.prepare_photos([first])
    assert not engine.snapshot().can_continue
    engine.start()
    done = engine.wait_until(lambda s: s.phase is Phase.FINISHED, timeout=TIMEOUT)
    assert done.can_continue and "Train more goes on from here" in done.message
    engine.prepare_photos([other])
    assert not engine.snapshot().can_continue
    assert "Train more goes on" not in engine.snapshot().message
    engine.prepare_photos([first])
    assert engine.snapshot().can_continue


def test_an_interrupted_generation_stops_and_the_next_one_runs(engine, faces_dir):
    engine.prepare_photos([str(faces_dir / "single" / "f2d_0.jpg")])
    engine.start()
    engine.wait_until(lambda s: s.phase is Phase.FINISHED, timeout=TIMEOUT)

    def interrupt_at_step_two(done: int, total: int) -> None:
        if done == 2:
            engine.interrupt_generation()

    with pytest.raises(GenerationInterrupted):
        engine.generate("a photo of {}", seeds=[0], num_inference_steps=5, progress=interrupt_at_step_two)
    assert len(engine.generate("a photo of {}", seeds=[0], num_inference_steps=2).images) == 1

    # the page asks for a run and enables Interrupt at once: a click before the run has begun stops it
    engine.expect_run("generation")
    engine.interrupt_generation()
    with pytest.raises(GenerationInterrupted):
        engine.generate("a photo of {}", seeds=[0], num_inference_steps=2)
    assert len(engine.generate("a photo of {}", seeds=[0], num_inference_steps=2).images) == 1, "only that one"


def test_an_exported_concept_carries_the_trade_off_slider_values(engine, faces_dir, tmp_path):
    from studio.concept_file import load_concept

    engine.prepare_photos([str(faces_dir / "single" / "f2d_0.jpg")])
    engine.start()
    engine.wait_until(lambda s: s.phase is Phase.FINISHED, timeout=TIMEOUT)
    engine.set_preview_settings((250, 700), 1.75)
    path = engine.export_concept(tmp_path / "c.safetensors")
    sample = load_concept(path).config["sample"]
    assert sample["band"] == [250, 700] and sample["balance"] == 1.75


def _preview_at(step: int, prompt: float, identity: float | None = None):
    from studio.events import PreviewReady

    score = ImageScores(IdentityScore(identity, identity is not None, "toy"), PromptScore(prompt, "toy"))
    return PreviewReady(step, (Image.new("RGB", (8, 8)),), ("",), (400, 800), 1.0, (score,))


def test_the_best_step_is_a_trained_one_even_when_the_untrained_start_scores_best():
    from studio.sweep import BestStep

    best = BestStep().with_preview(_preview_at(0, 30.0))
    assert best.step == 0  # alone, the start is all there is
    best = best.with_preview(_preview_at(25, 20.0)).with_preview(_preview_at(50, 25.0))
    assert best.step == 50 and "step 50" in best.note  # not step 0, although its prompt score is highest
    assert BestStep().with_preview(_preview_at(0, 9.0, 0.1)).with_preview(_preview_at(25, 5.0, 0.6)).step == 25


def test_one_lora_strength_slider_is_shown_per_file_and_named_after_it():
    from studio.ui.export_tab import MAX_LORAS, strength_sliders

    updates = strength_sliders(["/tmp/up/ink.safetensors", "/tmp/up/film grain.safetensors"])
    assert [u["visible"] for u in updates] == [True, True] + [False] * (MAX_LORAS - 2)
    assert [u["label"] for u in updates[:2]] == ["Strength · ink.safetensors", "Strength · film grain.safetensors"]
    assert not any(u["visible"] for u in strength_sliders(None)), "no sliders before a LoRA is added"


def test_a_message_for_people_stays_until_it_is_closed():
    from studio.compose import ComposeInputError

    error = views.user_error(ComposeInputError("Choose the concept file for person {1}."))
    assert error.message == "Choose the concept file for person {1}." and error.duration is None


def test_the_toy_pages_first_prompt_is_in_the_toy_worlds_words():
    from studio.toy.world import parse_prompt

    assert parse_prompt(ui_app.TOY_DEFAULT_PROMPT) == {"eyewear": "sunglasses", "setting": "forest", "style": "photo"}
