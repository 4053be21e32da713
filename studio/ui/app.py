"""The studio's Gradio Blocks: photos -> train (live) -> trade-off sliders -> generate / export.

The page is a form over engine snapshots: the layout functions build the components into a
``Page``, ``Handlers`` holds one named method per event (each finds the session's Engine, sends
it a command and renders the snapshot with ``studio.ui.views``), and ``wire`` connects them.
The training inputs come from one spec, ``studio.ui.form.TRAINING_FORM``.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import spaces

from studio.conditioning import check_prompt
from studio.config import StudioConfig, available_presets, load_preset
from studio.engine import Engine, NoConceptYet, Snapshot
from studio.errors import FormError
from studio.runner import CHUNK_DURATION_S, chunked_training, training_chunk
from studio.sampler import MAX_SEED, SCHEDULERS, GenerationInterrupted
from studio.ui import form, views
from studio.ui.compose_tab import build_compose_tab
from studio.ui.explore import build_explore_tab
from studio.ui.export_tab import build_export_tab
from studio.ui.sessions import KEEPALIVE_S, SessionRegistry, StudioFull

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_PHOTOS = sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))
# the Create images tab's first prompt; the toy world draws only its own words (docs/TOY.md)
DEFAULT_PROMPT = "a photo of {} as an astronaut on the moon"
TOY_DEFAULT_PROMPT = "a photo of {} wearing sunglasses in a forest"
# toy selfies of one identity never seen in pretraining (the toy world's own photos)
TOY_EXAMPLE_PHOTOS = sorted(str(p) for p in (ASSETS / "examples" / "toy").glob("*.png"))
STREAM_MIN_INTERVAL_S = 0.3  # at most ~3 page updates per second while training
# Runs in the page as a slider change is sent: the values as they are, and a number that grows with
# every change, so the server can tell the newest change from older ones that arrive late.
SLIDER_CLOCK_JS = "(lo, hi, gamma, _clock) => [lo, hi, gamma, (window.studioSliderClock = (window.studioSliderClock || 0) + 1)]"
SLIDER_DEBOUNCE_S = 0.35  # a burst of slider changes (keys, typing, a drag) renders once, after it
# On ZeroGPU these run in a GPU-attached process; everywhere else spaces.GPU returns fn unchanged.
GPU_TRAINING_CHUNK = spaces.GPU(duration=CHUNK_DURATION_S)(training_chunk)
GPU_DURATION_S = 90
# The training inputs' labels, in the order the /train API takes them.
TRAINING_SETTING_NAMES = tuple(field.label for field in form.TRAINING_FORM)
CSS = (ASSETS / "studio.css").read_text() if (ASSETS / "studio.css").is_file() else ""
# Gradio scopes CSS under its container, so a rule for the container itself goes in <head>: its
# overflow is hidden, which makes it the sticky live panel's scroll box (the panel would never
# stick); clip keeps the clipping without being a scroll container.
HEAD = "<style>@media (min-width: 1100px) { .gradio-container { overflow: clip !important; } }</style>"
# Gradio 6.31 names some of its buttons by untranslated keys ("common.upload", "common.clear"):
# screen readers read those out. This names them for people, whenever the page renders.
ACCESSIBLE_NAMES_JS = """() => {
  const names = {"common.upload": "Upload files", "common.clear": "Clear"};
  const rename = () => document.querySelectorAll('[aria-label^="common."]').forEach((el) => {
    const key = el.getAttribute('aria-label');
    const word = key.slice(7).replace(/_/g, ' ');
    el.setAttribute('aria-label', names[key] || word.charAt(0).toUpperCase() + word.slice(1));
  });
  new MutationObserver(rename).observe(document.body, {childList: true, subtree: true, attributes: true,
                                                     attributeFilter: ['aria-label']});
  rename();
}"""
# Images one Generate may ask for (the API too: each is a full denoising run on the shared gate).
MAX_IMAGES = 8
RANDOM_SEED = -1  # as in the A1111 web UI: a new random seed for each Generate

INTRO = """# PersonaMagic Studio
Teach Stable Diffusion a face from one or a few selfies, then **see** the identity-vs-editability
trade-off: the identity tokens act only inside a band of denoising steps, and a tandem balance keeps
them from drowning the rest of your prompt. *1 · Photos → 2 · Train → 3 · Trade-off → Generate.*"""


def _banner_update(model_source: str) -> dict:
    text = views.banner(model_source)
    return gr.update(value=text, visible=bool(text))


# ----------------------------------------------------------------------------- layout
def _photos_and_settings(page: SimpleNamespace, cfg: StudioConfig) -> None:
    """Left column: photos, what training sees, the training form."""
    gr.Markdown("### 1 · Photos")
    page.photos = gr.File(file_count="multiple", file_types=["image"], label="Selfies of one person (one is enough)",
                          elem_id="photos", height=140)
    if EXAMPLE_PHOTOS:
        toy = cfg.model.source == "toy" and TOY_EXAMPLE_PHOTOS
        singles = TOY_EXAMPLE_PHOTOS if toy else EXAMPLE_PHOTOS
        # the toy set also as one example of several photos, named so that it fits a phone's width
        gr.Examples(examples=[[[p]] for p in singles] + ([[TOY_EXAMPLE_PHOTOS]] if toy else []),
                    example_labels=[Path(p).name for p in singles] + ([f"all {len(TOY_EXAMPLE_PHOTOS)} together"] if toy else []),
                    inputs=[page.photos], label="Or try a sample photo")
    page.crops = gr.Gallery(label="What training sees: aligned crop + face mask", columns=4, height=200, elem_id="crops",
                            allow_preview=True, preview=False, fit_columns=False, interactive=False, object_fit="contain")
    page.photo_report = gr.Markdown(elem_id="photo-report")
    page.photo_choice = gr.CheckboxGroup([], value=[], label="Train on these photos", elem_id="photo-choice",
                                         visible=False)
    gr.Markdown("### 2 · Train")
    page.training = [form.STEPS.component(cfg)]
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        page.preset = gr.Dropdown(available_presets(), value=cfg.name, label="Preset", elem_id="preset")
        page.model_source = gr.Textbox(cfg.model.source, label="Base model: hub id, local diffusers folder or .safetensors file",
                                       elem_id="model-source")
        page.image_encoder = gr.Textbox(cfg.model.image_encoder or "", elem_id="image-encoder",
                                        label="Image encoder of the bypass: hub id, folder, 'tiny' or empty for none")
        page.model_note = gr.Markdown(elem_id="model-note")
        page.training += form.build(form.ADVANCED, cfg)
    gr.Markdown("*Train* learns a new concept in *Training steps*; *Train more* adds that many steps to the last "
                "finished or stopped run (same photos and settings).", elem_classes=["help"])


def _live_panel(page: SimpleNamespace, cfg: StudioConfig) -> None:
    """Right column (sticky): the commands, status, loss, trade-off sliders and previews together."""
    with gr.Row(elem_id="commands"):
        small = dict(size="sm", interactive=False, min_width=64)
        page.train_btn = gr.Button("Train", variant="primary", elem_id="train", **small)
        page.continue_btn = gr.Button("Train more", elem_id="continue", **small)
        page.pause_btn = gr.Button("Pause", elem_id="pause", **small)
        page.resume_btn = gr.Button("Resume", elem_id="resume", **small)
        page.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", **small)
        page.preview_btn = gr.Button("Preview now", elem_id="preview-now", **small)
        page.best_btn = gr.Button("Best step", elem_id="best-step", **small)
    page.status = gr.Markdown("**Idle** · add a photo to begin", elem_id="status")
    # The series are named in the label, not in a chart title and a legend: at 150 px those left
    # the curve about 25 px and one y tick.
    page.loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", color_map={"loss": "#9ca3af", "smoothed": "#7c3aed"},
                                 label="Training loss (grey: each step; purple: smoothed)", show_label=True,
                                 colors_in_legend=[], y_axis_format="~g", height=170, elem_id="loss-plot")
    gr.Markdown("### 3 · Trade-off (re-renders the previews, no retraining)")
    with gr.Row():
        page.band_lo = gr.Slider(0, 999, value=cfg.sample.band[0], step=1, label="Identity interval start t", elem_id="band-lo")
        page.band_hi = gr.Slider(1, 1000, value=cfg.sample.band[1], step=1, label="Identity interval end t", elem_id="band-hi")
        page.balance = gr.Slider(0.1, 4.0, value=cfg.sample.balance, step=0.05, label="Tandem balance γ", elem_id="balance")
    gr.Markdown(f"{views.SLIDER_HELP['band']}  \n{views.SLIDER_HELP['balance']}", elem_classes=["help"])
    page.slider_clock = gr.Number(None, visible=False)  # filled by SLIDER_CLOCK_JS as a change is sent
    # as tall as its pictures: a fixed 200 px cut them in half on a wide window, captions and all
    page.previews = gr.Gallery(label="Previews", columns=4, height="auto", elem_id="previews", interactive=False, object_fit="contain")


def _generate_tab(page: SimpleNamespace, cfg: StudioConfig) -> None:
    gr.Markdown("Uses the newest weights and the identity interval and balance set in *3 · Trade-off* above.",
                elem_classes=["help"])
    with gr.Row():
        default = TOY_DEFAULT_PROMPT if cfg.model.source == "toy" else DEFAULT_PROMPT
        page.prompt = gr.Textbox(default, label="Prompt ({} = the person)", elem_id="prompt", scale=3, min_width=300)
        page.negative = gr.Textbox(cfg.sample.negative_prompt, label="Negative prompt", scale=2, elem_id="negative")
    with gr.Row(equal_height=True):
        page.gen_seed = gr.Number(RANDOM_SEED, precision=0, label="Seed (-1 = random)", elem_id="gen-seed", min_width=120)
        # a word, not the dice emoji: fonts without emoji (common on Linux) drew it as a box
        page.dice_btn = gr.Button("Random", elem_id="random-seed", min_width=80, scale=0)
        page.gen_steps = gr.Slider(1, 100, value=cfg.sample.steps, step=1, label="Steps", elem_id="gen-steps")
        page.guidance = gr.Slider(0.0, 15.0, value=cfg.sample.guidance_scale, step=0.5, label="Guidance")
        page.scheduler = gr.Dropdown(list(SCHEDULERS), value=cfg.sample.scheduler, label="Scheduler")
    with gr.Row():
        page.num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Images", elem_id="num-images")
        side = dict(minimum=64, maximum=4 * max(cfg.image_size, 64), step=8, value=cfg.image_size)
        page.width = gr.Slider(label="Width", elem_id="gen-width", **side)
        page.height = gr.Slider(label="Height", elem_id="gen-height", **side)
    with gr.Row():
        page.generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        page.interrupt_btn = gr.Button("Interrupt", variant="stop", elem_id="interrupt", interactive=False, scale=1)
    page.generated = gr.Gallery(label="Generated", columns=4, height=320, elem_id="generated", interactive=False,
                                fit_columns=False, object_fit="contain")
    page.download_all = gr.File(label="Download all (PNG files with their settings)", interactive=False,
                                elem_id="download-all", height=80)


def _concept_tab(page: SimpleNamespace) -> None:
    gr.Markdown("Save what was learned as `.safetensors` (the mapper, its settings, the trade-off slider values, the "
                "reference image embedding and, after a finished or stopped run, the training state — not your photos; "
                "about 6 MB for SD 1.5, 19 MB with the training state), and load it later in a fresh session: add the "
                "same photos there and *Train more* goes on where this run ended.")
    with gr.Row():
        page.export_btn = gr.Button("Export concept", elem_id="export")
        page.export_file = gr.File(label="Download", interactive=False, elem_id="export-file", height=100)
    page.import_file = gr.File(label="Import a concept (.safetensors)", file_types=[".safetensors"], elem_id="import")
    page.concept_msg = gr.Markdown(elem_id="concept-msg")


def layout(cfg: StudioConfig, on: Handlers) -> SimpleNamespace:
    """Every component of the page, by name (the Explore, Compose and Export tabs wire their own)."""
    page = SimpleNamespace()
    gr.Markdown(INTRO, elem_id="intro")
    page.banner = gr.Markdown(views.banner(cfg.model.source), visible=bool(views.banner(cfg.model.source)),
                              elem_id="tiny-banner", elem_classes=["banner"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            _photos_and_settings(page, cfg)
        with gr.Column(scale=3, min_width=420, elem_id="live"):
            _live_panel(page, cfg)
    with gr.Tabs():
        with gr.Tab("Create images", elem_id="tab-generate"):
            _generate_tab(page, cfg)
        with gr.Tab("Explore", elem_id="tab-explore"):
            build_explore_tab(on.engine, on.folder, page.band_lo, page.band_hi, page.balance, page.previews,
                              on.on_previews_set, default_steps=cfg.sample.preview_steps)
        with gr.Tab("Compose", elem_id="tab-compose"):
            build_compose_tab(on.engine, cfg)
        with gr.Tab("Export & LoRAs", elem_id="tab-export-tools"):
            build_export_tab(on.engine, on.folder, on.own, page.band_lo, page.band_hi, page.balance, default_steps=cfg.sample.steps)
        with gr.Tab("Concept file", elem_id="tab-concept"):
            _concept_tab(page)
    page.buttons = [page.train_btn, page.continue_btn, page.pause_btn, page.resume_btn, page.stop_btn, page.preview_btn,
                    page.best_btn]
    page.state = [page.status, *page.buttons]  # what every handler refreshes: the phase and what it allows
    page.live = [page.status, page.loss_plot, page.previews, *page.buttons]
    page.sliders = [page.band_lo, page.band_hi, page.balance]
    return page


# ----------------------------------------------------------------------------- handlers
def render_state(snapshot: Snapshot, last: dict[str, Any] | None = None) -> list[Any]:
    """Status and the command buttons' states (views.CONTROLS order); unchanged buttons are skipped."""
    last = last if last is not None else {}
    allowed = views.controls(snapshot)
    buttons = [gr.update(interactive=allowed[name]) if last.get(name) != allowed[name] else gr.skip()
               for name in views.CONTROLS]
    last.update(allowed)
    return [views.status_markdown(snapshot), *buttons]


def render_live(snapshot: Snapshot, last: dict[str, Any] | None = None, *, plot: bool = True) -> list[Any]:
    """Status, loss plot, previews and buttons for a snapshot; unchanged parts are skipped."""
    last = last if last is not None else {}
    changed_plot = plot and last.get("losses") != len(snapshot.losses)
    loss = views.loss_frame(snapshot) if changed_plot else gr.skip()
    gallery = views.preview_items(snapshot) if last.get("preview") is not snapshot.preview else gr.skip()
    last.update(losses=len(snapshot.losses), preview=snapshot.preview)
    status, *buttons = render_state(snapshot, last)
    return [status, loss, gallery, *buttons]


@dataclass
class SliderLine:
    """One session's trade-off slider changes: the number of the newest one seen, and the lock
    that lets one preview render run at a time."""

    newest: float = 0.0
    others: int = 0  # previews rendered meanwhile by anything else (Preview now, Best step, an import)
    rendering: asyncio.Lock = field(default_factory=asyncio.Lock)


class Handlers:
    """One named method per page event; each is given the session by Gradio's request."""

    def __init__(self, sessions: SessionRegistry, chunked: bool) -> None:
        self.sessions = sessions
        self.chunked = chunked  # ZeroGPU: the request drives training in GPU chunks
        self._slider_lines: dict[str, SliderLine] = {}
        sessions.when_closed(lambda key: self._slider_lines.pop(key, None))
        # Accelerator work: on ZeroGPU these run in a GPU-attached process (decorated once, at start).
        self.on_preview = spaces.GPU(duration=GPU_DURATION_S)(self._preview)
        self.on_slider = spaces.GPU(duration=GPU_DURATION_S)(self._slider)
        self.on_generate = spaces.GPU(duration=GPU_DURATION_S)(self._generate)

    @staticmethod
    def key(request: gr.Request) -> str:
        return request.session_hash or "anonymous"

    def folder(self, request: gr.Request) -> Path:
        """The session's own folder: everything written there goes when the session closes."""
        return self.sessions.folder(self.key(request))

    def own(self, request: gr.Request, *paths: str | Path | None) -> None:
        """Uploaded files of this session: deleted when it closes."""
        self.sessions.own(self.key(request), *paths)

    def engine(self, request: gr.Request) -> Engine:
        try:
            return self.sessions.get(self.key(request))
        except StudioFull as exc:
            raise views.user_error(exc) from None

    # -------------------------------------------------------------- photos
    def on_photos(self, files: list[str] | None, request: gr.Request) -> list[Any]:
        """New upload box contents; an emptied box (its ✕) forgets the photos."""
        from studio.faces import PhotoError

        engine = self.engine(request)
        report = ""
        if not files:
            engine.clear_photos()
        else:
            self.own(request, *files)
            try:
                engine.prepare_photos(files)
            except PhotoError as exc:
                engine.clear_photos()  # the box holds no usable photo: train on none
                gr.Warning(str(exc))
                report = f"✗ {exc}"
        snapshot = engine.snapshot()
        report = report or views.photo_report(snapshot.photo_pool, snapshot.prepared)
        crops, choice = self._photo_outputs(snapshot, request)
        return [crops, report, choice, *render_state(snapshot)]

    def _photo_outputs(self, snapshot: Snapshot, request: gr.Request) -> list[Any]:
        choices, value = views.photo_choices(snapshot.photo_pool, snapshot.prepared)
        crops = views.photo_items(snapshot.photo_pool, snapshot.prepared, self.folder(request))
        return [crops, gr.update(choices=choices, value=value, visible=len(choices) > 1)]

    def on_choose_photos(self, names: list[str], request: gr.Request) -> list[Any]:
        engine = self.engine(request)
        refused = False
        try:
            engine.choose_photos(names or [])
        except (ValueError, RuntimeError) as exc:
            gr.Warning(views.error_text(exc))
            refused = True
        snapshot = engine.snapshot()
        crops, choice = self._photo_outputs(snapshot, request)
        # an accepted choice is what the page already shows: sending it back would undo a tick
        # made meanwhile, which is sent next (trigger_mode "always_last"); a refused one is put back
        report = views.photo_report(snapshot.photo_pool, snapshot.prepared)  # which photos are trained on
        return [crops, report, choice if refused else gr.skip(), *render_state(snapshot)]

    # -------------------------------------------------------------- training
    async def on_train(self, request: gr.Request, *values: Any):
        """Train a new concept: the training form's values, then the live band and balance."""
        overrides = form.overrides(form.TRAINING_FORM, values[: len(form.TRAINING_FORM)])
        engine = await asyncio.to_thread(self.engine, request)
        async for outputs in self._stream(engine, lambda **mode: engine.start(overrides, **mode), *values[-3:]):
            yield outputs

    async def on_continue(self, request: gr.Request, more_steps: Any, lo: Any, hi: Any, gamma: Any):
        more = views.as_number(more_steps, "The number of extra steps", whole=True)
        engine = await asyncio.to_thread(self.engine, request)
        async for outputs in self._stream(engine, lambda **mode: engine.continue_training(more, **mode), lo, hi, gamma):
            yield outputs

    async def _stream(self, engine: Engine, launch, lo: Any, hi: Any, gamma: Any):
        """Start ``launch`` and stream its snapshots, locally (a background thread trains) or on
        ZeroGPU (no thread may hold the GPU: this request drives GPU chunks itself)."""
        band, balance = _interval(lo, hi), views.as_number(gamma, "The tandem balance")

        def start() -> Iterator[Snapshot] | None:
            engine.set_preview_settings(band, balance)
            return launch(foreground=True, gpu_call=GPU_TRAINING_CHUNK) if self.chunked else launch()

        try:  # off the event loop: a start that waits on a lock (or joins a thread) stalls no other page
            driven = await asyncio.to_thread(start)
        except (ValueError, RuntimeError) as exc:  # ConfigError is a ValueError
            raise views.user_error(exc) from None
        last: dict[str, Any] = {}
        version, position, sent = -1, None, 0.0
        while True:
            if driven is not None:
                snapshot = await asyncio.to_thread(next, driven, None)
                if snapshot is None:
                    return
            else:
                snapshot = await asyncio.to_thread(engine.wait_for_change, version, 0.5)
            if snapshot.version != version or snapshot.queue_position != position:
                if snapshot.active and time.monotonic() - sent < STREAM_MIN_INTERVAL_S:
                    if driven is not None:
                        continue  # the driver goes on; the next frame carries the newest state
                    await asyncio.sleep(STREAM_MIN_INTERVAL_S)  # rate limit only; state is re-read below
                    snapshot = engine.snapshot()
                version, position, sent = snapshot.version, snapshot.queue_position, time.monotonic()
                yield render_live(snapshot, last)
            if driven is None and not snapshot.active:
                return

    def on_stop_click(self, request: gr.Request) -> None:
        """The page's Stop: ask the run to stop after its step. The page's training stream is the
        one writer of the live view: it sees the end and sends it as its last frame."""
        self.engine(request).stop()

    def on_stop(self, request: gr.Request) -> str:
        """The ``/stop`` endpoint for API clients: stop, wait for the end, return the status text."""
        engine = self.engine(request)
        engine.stop()
        try:
            snapshot = engine.wait_until(lambda s: not s.active, timeout=views.STOP_TIMEOUT_S)
        except TimeoutError:
            snapshot = engine.snapshot()
        return views.status_markdown(snapshot)

    def on_pause(self, request: gr.Request) -> list[Any]:
        self.engine(request).pause()
        return render_state(self.engine(request).snapshot())

    def on_resume(self, request: gr.Request) -> list[Any]:
        self.engine(request).resume()
        return render_state(self.engine(request).snapshot())

    def on_best_step(self, request: gr.Request) -> list[Any]:
        engine = self.engine(request)
        try:
            engine.use_best_step()
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return render_state(engine.snapshot())

    # -------------------------------------------------------------- previews
    def _render_previews(self, lo: Any, hi: Any, gamma: Any, request: gr.Request, *, quiet: bool) -> Engine | None:
        """Render the previews at these slider values (they also become the live training-preview
        settings); the session's engine, or None when there was nothing to render.

        quiet (slider moves, imports): nothing to preview yet is no error, a bad interval a warning.
        """
        engine = self.engine(request)
        try:
            engine.render_previews(_interval(lo, hi), views.as_number(gamma, "The tandem balance"))
        except (ValueError, RuntimeError) as exc:
            if not quiet:
                raise views.user_error(exc) from None
            if not isinstance(exc, NoConceptYet):
                gr.Warning(views.error_text(exc))
            return None
        return engine

    def _preview(self, lo: Any, hi: Any, gamma: Any, request: gr.Request) -> list[Any]:
        """Preview now: the live view (the loss plot is not resent: it has not changed)."""
        self._slider_line(self.key(request)).others += 1
        return render_live(self._render_previews(lo, hi, gamma, request, quiet=False).snapshot(), plot=False)

    def _slider(self, lo: Any, hi: Any, gamma: Any, request: gr.Request) -> Any:
        """The previews alone: a slider move changes nothing else, and an event's outputs are what
        Gradio marks as pending, so the status and plot stay as they are."""
        engine = self._render_previews(lo, hi, gamma, request, quiet=True)
        return views.preview_items(engine.snapshot()) if engine is not None else gr.skip()

    def on_previews_set(self, lo: Any, hi: Any, gamma: Any, request: gr.Request) -> Any:
        """The previews at slider values something else has just set (Best step, an import); a
        slider change still waiting to render gives way to it."""
        self._slider_line(self.key(request)).others += 1
        return self.on_slider(lo, hi, gamma, request)

    async def on_slider_input(self, lo: Any, hi: Any, gamma: Any, clock: Any = None, request: gr.Request = None) -> Any:
        """Every committed slider change (drag, arrow keys, typed value) re-renders, debounced: only
        the last change of a burst renders, once the burst has paused for SLIDER_DEBOUNCE_S.

        The page numbers each change as it happens (``clock``, SLIDER_CLOCK_JS): the requests of
        one drag can arrive out of order, and an older value must never be what the previews show.
        A call without a number (the HTTP API) counts as the newest change."""
        key = self.key(request)
        line = self._slider_line(key)
        clock = line.newest + 1.0 if clock is None else float(clock)
        if clock <= line.newest:
            return gr.skip()  # a newer change has already arrived
        line.newest, others = clock, line.others
        await self._burst_pause()
        async with line.rendering:  # one render at a time, so the newest one finishes last
            if line.newest != clock or line.others != others:
                return gr.skip()  # a newer change follows, or another render has set the previews since
            return await asyncio.to_thread(self.on_slider, lo, hi, gamma, request)

    @staticmethod
    async def _burst_pause() -> None:
        await asyncio.sleep(SLIDER_DEBOUNCE_S)

    def _slider_line(self, key: str) -> SliderLine:
        """This session's slider changes in flight (forgotten when the session closes)."""
        return self._slider_lines.setdefault(key, SliderLine())

    # -------------------------------------------------------------- images
    def _generate(self, text: str, negative: str, seed: Any, steps: Any, guidance: Any, scheduler: str, count: Any,
                  lo: Any, hi: Any, gamma: Any, width: Any = None, height: Any = None, request: gr.Request = None,
                  progress=gr.Progress()) -> list[Any]:
        """Images with the newest concept; seed -1 picks a random one. Returns the gallery and the .zip."""
        engine = self.engine(request)
        if seed is None:
            raise views.user_error(FormError("Fill in a seed (a whole number, -1 for a random one) to generate."))
        first = views.as_number(seed, "The seed", whole=True)
        first = random.randrange(MAX_SEED - MAX_IMAGES) if first == RANDOM_SEED else first
        size = _image_size(engine, width, height)
        try:
            result = engine.generate(
                text, negative_prompt=negative or "", seeds=[first + i for i in range(_images_wanted(count))],
                num_inference_steps=views.as_number(steps, "The number of steps", whole=True),
                guidance_scale=views.as_number(guidance, "The guidance scale"), scheduler=scheduler,
                band=_interval(lo, hi), balance=views.as_number(gamma, "The tandem balance"),
                progress=lambda done, total: progress((done, total), desc="Denoising"), **size,
            )
        except GenerationInterrupted as exc:
            gr.Warning(f"Interrupted: {exc}")
            return [gr.skip(), gr.skip()]
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        snapshot = engine.snapshot()
        steps_done = snapshot.concept.steps_done if snapshot.concept is not None else snapshot.step
        folder = self.folder(request)
        items = views.generated_items(result, steps_done, folder, model=snapshot.backbone)
        return [items, views.zip_of([path for path, _caption in items], folder)]

    def expect_generation(self, request: gr.Request) -> None:
        self.engine(request).expect_run("generation")

    def on_interrupt(self, request: gr.Request) -> None:
        self.engine(request).interrupt_generation()

    # -------------------------------------------------------------- concept files
    def on_export(self, request: gr.Request) -> list[Any]:
        engine = self.engine(request)
        folder = self.folder(request)  # deleted with the session
        try:
            path = engine.export_concept(folder / f"personamagic-concept-step{engine.snapshot().step}.safetensors")
        except (ValueError, OSError) as exc:
            raise views.user_error(exc) from None
        return [str(path), f"✓ Exported `{path.name}`."]

    def on_import(self, file: str | None, request: gr.Request) -> list[Any]:
        """Load a concept file; its trade-off slider values come back with it. A cleared box clears the note."""
        engine = self.engine(request)
        if not file:
            return ["", *[gr.skip()] * 3, *render_state(engine.snapshot())]
        self.own(request, file)
        try:
            concept = engine.import_concept(file)
        except (ValueError, OSError, RuntimeError) as exc:
            gr.Warning(views.error_text(exc))
            return [f"✗ {views.error_text(exc)}", *[gr.skip()] * 3, *render_state(engine.snapshot())]
        note = (f"✓ Loaded a concept ({concept.num_tokens} tokens, {concept.steps_done} steps, "
                f"super-category “{concept.super_category}”).")
        sample = concept.config.get("sample", {}) if isinstance(concept.config, dict) else {}
        band, balance = sample.get("band"), sample.get("balance")
        sliders = [band[0], band[1], balance] if band and balance is not None else [gr.skip()] * 3
        return [note, *sliders, *render_state(engine.snapshot())]

    # -------------------------------------------------------------- presets and models
    def on_preset(self, name: str, request: gr.Request) -> list[Any]:
        engine = self.engine(request)
        try:
            new_cfg = load_preset(name)
            engine.configure(new_cfg)
        except (ValueError, RuntimeError) as exc:  # ConfigError is a ValueError
            raise views.user_error(exc) from None
        sample = new_cfg.sample
        return [_banner_update(new_cfg.model.source), new_cfg.model.source, new_cfg.model.image_encoder or "",
                *form.values_from(form.TRAINING_FORM, new_cfg), sample.band[0], sample.band[1], sample.balance]

    def on_model_source(self, source: str, encoder: str, request: gr.Request) -> list[Any]:
        """Check the chosen model at once (files, architecture, image encoder), then load it: the
        noise banner stays until a real model has loaded, and the note says which one did."""
        from studio.weights import check

        engine = self.engine(request)
        model = {"model.source": source.strip(), "model.image_encoder": encoder.strip() or None}
        if model == {"model.source": engine.cfg.model.source, "model.image_encoder": engine.cfg.model.image_encoder}:
            return [gr.skip(), gr.skip()]
        try:
            cfg = engine.cfg.replace(**model)
            check(cfg.model)
            engine.configure(cfg)
            backbone = engine.backbone()
        except (ValueError, RuntimeError) as exc:  # BackboneUnavailable is a RuntimeError
            raise views.user_error(exc) from None
        notes = "".join(f"  \n*{note}*" for note in backbone.notes)
        return [_banner_update(backbone.source), f"✓ Loaded {backbone.describe()}.{notes}"]

    # -------------------------------------------------------------- lifetime
    def on_unload(self, request: gr.Request) -> None:
        self.sessions.close(self.key(request))

    def on_keepalive(self, request: gr.Request) -> None:  # an open tab is a live session, even when idle
        self.sessions.touch(self.key(request))


def _interval(lo: Any, hi: Any) -> tuple[int, int]:
    return views.as_number(lo, "The interval start", whole=True), views.as_number(hi, "The interval end", whole=True)


def _image_size(engine: Engine, width: Any, height: Any) -> dict[str, int]:
    """Width and height rounded to the model's size multiple (as the A1111 web UI rounds to 8)."""
    backbone = engine.backbone()
    return {name: backbone.rounded_side(views.as_number(value, f"The image {name}", whole=True))
            for name, value in (("width", width), ("height", height)) if value is not None}


def _images_wanted(count: Any) -> int:
    count = views.as_number(count, "The number of images", whole=True)
    if not 1 <= count <= MAX_IMAGES:
        raise views.user_error(FormError(f"Generate from 1 to {MAX_IMAGES} images at a time, got {count}."))
    return count


# ----------------------------------------------------------------------------- wiring
def wire(page: SimpleNamespace, on: Handlers) -> None:
    """Connect every event; the API names are the public HTTP endpoints (tests/test_client.py)."""
    always = dict(concurrency_limit=None)
    photos_out = [page.crops, page.photo_report, page.photo_choice, *page.state]
    page.photos.change(on.on_photos, [page.photos], photos_out, api_name="photos")
    # each tick sends the whole choice: a tick made while one is handled is sent after it, not dropped
    page.photo_choice.input(on.on_choose_photos, [page.photo_choice], photos_out,
                            api_name="choose_photos", trigger_mode="always_last", **always)
    live_inputs = [*page.training, *page.sliders]
    train = page.train_btn.click(on.on_train, live_inputs, page.live, api_name="train", **always)
    more = page.continue_btn.click(on.on_continue, [page.training[0], *page.sliders], page.live, api_name="continue", **always)
    # Stop neither cancels the training stream nor writes the live view: a second writer's frame
    # could land after the stream's last one and leave the page saying "Training"
    # (docs/ARCHITECTURE.md, "From upload to preview")
    page.stop_btn.click(on.on_stop_click, None, None, api_visibility="private", **always)
    gr.api(on.on_stop, api_name="stop", **always)
    page.pause_btn.click(on.on_pause, None, page.state, api_name="pause", **always)
    page.resume_btn.click(on.on_resume, None, page.state, api_name="resume", **always)
    page.best_btn.click(on.on_best_step, None, page.state, api_name="best_step", **always).then(
        on.on_previews_set, page.sliders, page.previews, show_progress="hidden", **always)
    page.preview_btn.click(on.on_preview, page.sliders, page.live, api_name="preview", **always)
    gr.on([slider.input for slider in page.sliders], on.on_slider_input, [*page.sliders, page.slider_clock],
          page.previews, js=SLIDER_CLOCK_JS, api_name="sliders", show_progress="hidden", trigger_mode="multiple", **always)
    _wire_generate(page, on)
    page.export_btn.click(on.on_export, None, [page.export_file, page.concept_msg], api_name="export", **always)
    page.import_file.change(on.on_import, [page.import_file], [page.concept_msg, *page.sliders, *page.state],
                            api_name="import", **always).then(
        on.on_previews_set, page.sliders, page.previews, show_progress="hidden", **always)  # show the imported concept
    page.preset.change(on.on_preset, [page.preset],
                       [page.banner, page.model_source, page.image_encoder, *page.training, *page.sliders], api_name="preset")
    for box in (page.model_source, page.image_encoder):
        box.submit(on.on_model_source, [page.model_source, page.image_encoder], [page.banner, page.model_note],
                   api_name="model_source" if box is page.model_source else "image_encoder")


def _wire_generate(page: SimpleNamespace, on: Handlers) -> None:
    """Generate disables itself and enables Interrupt while it runs; the dice asks for a random seed."""
    running = [page.generate_btn, page.interrupt_btn]
    page.dice_btn.click(lambda: RANDOM_SEED, None, [page.gen_seed], api_visibility="private", queue=False)
    inputs = [page.prompt, page.negative, page.gen_seed, page.gen_steps, page.guidance, page.scheduler,
              page.num_images, *page.sliders, page.width, page.height]
    # a prompt without its {} is said at the prompt box, and the gallery keeps its images
    generate = views.start_checked(page.generate_btn, {page.prompt: check_prompt}, running, starts=1,
                                   on_start=on.expect_generation).then(
        on.on_generate, inputs, [page.generated, page.download_all], api_name="generate", concurrency_limit=None,
    )
    views.afterwards(generate, views.while_running(False, starts=1), None, running, api_visibility="private", queue=False)
    page.interrupt_btn.click(on.on_interrupt, None, None, api_name="interrupt", concurrency_limit=None)


def build_demo(cfg: StudioConfig) -> gr.Blocks:
    """The whole studio for a starting preset; each browser session gets its own Engine."""
    # Session folders inside Gradio's cache: files returned from there are served without a copy,
    # so deleting a closed session's folder really removes its exports and crops.
    sessions = SessionRegistry(cfg, root=Path(gr.utils.get_upload_folder()) / "studio-sessions")
    sessions.share(*EXAMPLE_PHOTOS, *TOY_EXAMPLE_PHOTOS)  # every visitor is handed the same cached copies
    threading.Thread(target=_reap_idle_sessions, args=(sessions,), name="idle-sessions", daemon=True).start()
    handlers = Handlers(sessions, chunked=chunked_training())
    with gr.Blocks(title="PersonaMagic Studio", delete_cache=(3600, 3600)) as demo:
        demo.sessions = sessions  # for tests and app.py
        page = layout(cfg, handlers)
        wire(page, handlers)
        gr.Timer(KEEPALIVE_S).tick(handlers.on_keepalive, None, None, api_visibility="private", queue=False)
        demo.unload(handlers.on_unload)
    return demo


def _reap_idle_sessions(sessions: SessionRegistry) -> None:
    """Sessions without a heartbeat (REST, scripts) never unload: close them when idle."""
    while True:
        time.sleep(KEEPALIVE_S)
        try:
            sessions.close_idle()
        except Exception:  # the reaper must outlive any one failed close
            logging.getLogger(__name__).exception("closing idle sessions failed")
