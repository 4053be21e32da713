"""The studio's Gradio Blocks: photos -> train (live) -> trade-off sliders -> generate / export.

Handlers are thin: they find the session's Engine, send it a command, and render snapshots
with ``studio.ui.views``. Every expected error becomes a plain sentence in the page.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import spaces

from studio.config import ConfigError, StudioConfig, available_presets, check_band, load_preset
from studio.engine import Engine, NoConceptYet, Snapshot
from studio.errors import FormError
from studio.runner import CHUNK_DURATION_S, chunked_training, training_chunk
from studio.sampler import SCHEDULERS
from studio.ui import views
from studio.ui.compose_tab import build_compose_tab
from studio.ui.explore import build_explore_tab
from studio.ui.export_tab import build_export_tab
from studio.ui.sessions import KEEPALIVE_S, SessionRegistry, StudioFull

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLE_PHOTOS = sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))
# toy selfies of one identity never seen in pretraining (the toy world's own photos)
TOY_EXAMPLE_PHOTOS = sorted(str(p) for p in (ASSETS / "examples" / "toy").glob("*.png"))


def _banner_update(model_source: str) -> dict:
    text = views.banner(model_source)
    return gr.update(value=text, visible=bool(text))
STREAM_MIN_INTERVAL_S = 0.3  # at most ~3 page updates per second while training
# On ZeroGPU these run in a GPU-attached process; everywhere else spaces.GPU returns fn unchanged.
GPU_TRAINING_CHUNK = spaces.GPU(duration=CHUNK_DURATION_S)(training_chunk)
GPU_DURATION_S = 90
# The training inputs in the order the handlers receive them, as their labels read.
TRAINING_SETTING_NAMES = (
    "Training steps", "Learning rate", "Batch size", "Seed", "Training band start t", "Training band end t",
    "Tandem weight λ", "Tandem target β", "Preview every N steps", "Class-guided regularization weight",
)
CSS = (ASSETS / "studio.css").read_text() if (ASSETS / "studio.css").is_file() else ""

INTRO = """# PersonaMagic Studio
Teach Stable Diffusion a face from one or a few selfies, then **see** the identity-vs-editability
trade-off: the identity tokens act only inside a band of denoising steps, and a tandem balance keeps
them from drowning the rest of your prompt. *1 · Photos → 2 · Train → 3 · Trade-off → Generate.*"""


# Images one Generate may ask for (the API too: each is a full denoising run on the shared gate).
MAX_IMAGES = 8


def build_demo(cfg: StudioConfig) -> gr.Blocks:
    """The whole studio for a starting preset; each browser session gets its own Engine."""
    # Session folders inside Gradio's cache: files returned from there are served without a copy,
    # so deleting a closed session's folder really removes its exports and crops.
    sessions = SessionRegistry(cfg, root=Path(gr.utils.get_upload_folder()) / "studio-sessions")

    def interval(lo: Any, hi: Any) -> tuple[int, int]:
        return (views.as_number(lo, "The interval start", whole=True), views.as_number(hi, "The interval end", whole=True))

    def images_wanted(count: Any) -> int:
        count = views.as_number(count, "The number of images", whole=True)
        if not 1 <= count <= MAX_IMAGES:
            raise views.user_error(FormError(f"Generate from 1 to {MAX_IMAGES} images at a time, got {count}."))
        return count

    def engine_for(request: gr.Request) -> Engine:
        try:
            return sessions.get(request.session_hash or "anonymous")
        except StudioFull as exc:
            raise views.user_error(exc) from None

    def reap_idle_sessions() -> None:  # sessions without a heartbeat (REST, scripts) never unload
        while True:
            time.sleep(KEEPALIVE_S)
            try:
                sessions.close_idle()
            except Exception:  # the reaper must outlive any one failed close
                logging.getLogger(__name__).exception("closing idle sessions failed")

    threading.Thread(target=reap_idle_sessions, name="idle-sessions", daemon=True).start()

    with gr.Blocks(title="PersonaMagic Studio", delete_cache=(3600, 3600)) as demo:
        demo.sessions = sessions  # for tests and app.py
        gr.Markdown(INTRO, elem_id="intro")
        banner = gr.Markdown(views.banner(cfg.model.source), visible=bool(views.banner(cfg.model.source)),
                             elem_id="tiny-banner", elem_classes=["banner"])

        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- left: photos + training
            with gr.Column(scale=2, min_width=360):
                gr.Markdown("### 1 · Photos")
                photos = gr.File(
                    file_count="multiple", file_types=["image"], label="Selfies of one person (one is enough)",
                    elem_id="photos", height=140,
                )
                if EXAMPLE_PHOTOS:
                    gr.Examples(examples=[[[p]] for p in (TOY_EXAMPLE_PHOTOS if cfg.model.source == "toy" else EXAMPLE_PHOTOS)]
                                + ([[TOY_EXAMPLE_PHOTOS]] if cfg.model.source == "toy" and TOY_EXAMPLE_PHOTOS else []),
                                inputs=[photos], label="Or try a sample photo")
                crops = gr.Gallery(
                    label="What training sees: aligned crop + face mask", columns=4, height=220,
                    elem_id="crops", allow_preview=True, preview=False, fit_columns=False, interactive=False, object_fit="contain",
                )
                photo_report = gr.Markdown(elem_id="photo-report")

                gr.Markdown("### 2 · Train")
                steps = gr.Slider(1, 3000, value=cfg.train.steps, step=1, label="Training steps", elem_id="steps")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    preset = gr.Dropdown(available_presets(), value=cfg.name, label="Preset", elem_id="preset")
                    model_source = gr.Textbox(
                        cfg.model.source, label="Base model: hub id, local diffusers folder or .safetensors file",
                        elem_id="model-source",
                    )
                    image_encoder = gr.Textbox(
                        cfg.model.image_encoder or "", label="Image encoder of the bypass: hub id, folder, 'tiny' or empty for none",
                        elem_id="image-encoder",
                    )
                    model_note = gr.Markdown(elem_id="model-note")
                    with gr.Row():
                        lr = gr.Number(cfg.train.lr, label="Learning rate", elem_id="lr")
                        batch_size = gr.Slider(1, 8, value=cfg.train.batch_size, step=1, label="Batch size")
                        seed = gr.Number(cfg.train.seed, precision=0, label="Seed", elem_id="seed")
                    with gr.Row():
                        train_lo = gr.Number(cfg.train.band[0], precision=0, label="Training band start t")
                        train_hi = gr.Number(cfg.train.band[1], precision=0, label="Training band end t")
                    with gr.Row():
                        te_weight = gr.Number(cfg.train.te_weight, label="Tandem weight λ")
                        te_balance = gr.Slider(0.0, 1.0, value=cfg.train.te_balance, step=0.05, label="Tandem target β")
                        preview_every = gr.Number(cfg.train.preview_every, precision=0, label="Preview every N steps")
                    cgdr_weight = gr.Slider(
                        0.0, 2.0, value=cfg.train.cgdr_weight, step=0.05, elem_id="cgdr-weight",
                        label="Class-guided regularization weight (0 = off; outside the face, match the class prompt)",
                    )
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", scale=2, elem_id="train")
                    continue_btn = gr.Button("Train more", scale=1, elem_id="continue")
                gr.Markdown(
                    "*Train* learns a new concept in *Training steps*; *Train more* adds that many steps "
                    "to the last finished or stopped run (same photos and settings).",
                    elem_classes=["help"],
                )
                with gr.Row():
                    pause_btn = gr.Button("Pause", size="sm", min_width=60, elem_id="pause")
                    resume_btn = gr.Button("Resume", size="sm", min_width=60, elem_id="resume")
                    stop_btn = gr.Button("Stop", variant="stop", size="sm", min_width=60, elem_id="stop")
                    preview_btn = gr.Button("Preview now", size="sm", min_width=90, elem_id="preview-now")

            # ---------------------------------------------------------------- right: live view
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("**Idle** · add a photo to begin", elem_id="status")
                loss_plot = gr.LinePlot(
                    None, x="step", y="loss", color="series",
                    color_map={"loss": "#9ca3af", "smoothed": "#7c3aed"},
                    title="Training loss", height=220, elem_id="loss-plot",
                )
                gr.Markdown("### 3 · Trade-off (re-renders the previews, no retraining)")
                with gr.Row():
                    band_lo = gr.Slider(0, 999, value=cfg.sample.band[0], step=1, label="Identity interval start t", elem_id="band-lo")
                    band_hi = gr.Slider(1, 1000, value=cfg.sample.band[1], step=1, label="Identity interval end t", elem_id="band-hi")
                gr.Markdown(views.SLIDER_HELP["band"], elem_classes=["help"])
                balance = gr.Slider(0.1, 4.0, value=cfg.sample.balance, step=0.05, label="Tandem balance γ", elem_id="balance")
                gr.Markdown(views.SLIDER_HELP["balance"], elem_classes=["help"])
                previews = gr.Gallery(
                    label="Previews", columns=4, height=300, elem_id="previews", interactive=False, object_fit="contain"
                )

        with gr.Tabs():
            with gr.Tab("Generate", elem_id="tab-generate"):
                gr.Markdown(
                    "Uses the newest weights and the identity interval and balance set in *3 · Trade-off* above.",
                    elem_classes=["help"],
                )
                with gr.Row():
                    prompt = gr.Textbox(
                        "a photo of {} as an astronaut on the moon", label="Prompt ({} = the person)", elem_id="prompt", scale=3
                    )
                    negative = gr.Textbox(cfg.sample.negative_prompt, label="Negative prompt", scale=2)
                with gr.Row():
                    gen_seed = gr.Number(0, precision=0, label="Seed")
                    gen_steps = gr.Slider(1, 100, value=cfg.sample.steps, step=1, label="Steps", elem_id="gen-steps")
                    guidance = gr.Slider(0.0, 15.0, value=cfg.sample.guidance_scale, step=0.5, label="Guidance")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=cfg.sample.scheduler, label="Scheduler")
                    num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Images")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                generated = gr.Gallery(
                    label="Generated", columns=4, height=320, elem_id="generated", interactive=False,
                    fit_columns=False, object_fit="contain",
                )
            with gr.Tab("Explore", elem_id="tab-explore"):
                build_explore_tab(engine_for, band_lo, band_hi, balance, default_steps=cfg.sample.preview_steps)
            with gr.Tab("Compose", elem_id="tab-compose"):
                build_compose_tab(engine_for, cfg)
            with gr.Tab("Export & LoRAs", elem_id="tab-export-tools"):
                build_export_tab(engine_for, sessions, band_lo, band_hi, balance, default_steps=cfg.sample.steps)
            with gr.Tab("Concept file", elem_id="tab-concept"):
                gr.Markdown(
                    "Save what was learned as `.safetensors` (the mapper, its settings, the reference image "
                    "embedding and, after a finished or stopped run, the training state — not your photos; "
                    "about 6 MB for SD 1.5, 19 MB with the training state), and load it later in a fresh "
                    "session: add the same photos there and *Train more* goes on where this run ended."
                )
                with gr.Row():
                    export_btn = gr.Button("Export concept", elem_id="export")
                    export_file = gr.File(label="Download", interactive=False, elem_id="export-file", height=100)
                import_file = gr.File(label="Import a concept (.safetensors)", file_types=[".safetensors"], elem_id="import")
                concept_msg = gr.Markdown(elem_id="concept-msg")

        settings = [steps, lr, batch_size, seed, train_lo, train_hi, te_weight, te_balance, preview_every, cgdr_weight]
        live_outputs = [status, loss_plot, previews]

        # ---------------------------------------------------------------- handlers
        def render(snapshot: Snapshot, last: dict[str, Any] | None = None) -> list[Any]:
            """Status, plot and previews for a snapshot; unchanged parts are skipped."""
            last = last if last is not None else {}
            plot = views.loss_frame(snapshot) if last.get("losses") != len(snapshot.losses) else gr.skip()
            gallery = views.preview_items(snapshot) if last.get("preview") is not snapshot.preview else gr.skip()
            last.update(losses=len(snapshot.losses), preview=snapshot.preview)
            return [views.status_markdown(snapshot), plot, gallery]

        def on_photos(files: list[str] | None, request: gr.Request):
            engine = engine_for(request)
            if not files:
                return gr.skip(), gr.skip()
            sessions.own(request.session_hash or "anonymous", *files)  # deleted when the session closes
            from studio.faces import PhotoError

            try:
                prepared = engine.prepare_photos(files)
            except PhotoError as exc:
                gr.Warning(str(exc))
                return gr.skip(), f"✗ {exc}"
            folder = sessions.folder(request.session_hash or "anonymous")  # crops go with the session
            return views.photo_items(prepared, folder), views.photo_report(prepared)

        def overrides_from(values: list[Any]) -> dict[str, Any]:
            """Dotted overrides from the training settings; an emptied field is named, not a crash."""
            missing = [name for name, value in zip(TRAINING_SETTING_NAMES, values) if value is None]
            if missing:
                raise FormError(f"Fill in {', '.join(missing)} (a number) before training.")
            n_steps, lr_, batch, seed_, lo, hi, te_w, te_b, every, cgdr_w = values
            num = views.as_number
            band = check_band([num(lo, "The training band start", whole=True), num(hi, "The training band end", whole=True)],
                              "training band")
            return {
                "train.steps": num(n_steps, "The number of training steps", whole=True),
                "train.lr": num(lr_, "The learning rate"),
                "train.batch_size": num(batch, "The batch size", whole=True),
                "train.seed": num(seed_, "The training seed", whole=True), "train.band": list(band),
                "train.te_weight": num(te_w, "The TE weight"), "train.te_balance": num(te_b, "The TE balance"),
                "train.preview_every": num(every, "Preview every", whole=True),
                "train.cgdr_weight": num(cgdr_w, "The class-guided regularization weight"),
            }

        def begin(engine: Engine, launch, band: tuple[int, int], gamma: float, **mode: Any):
            """Set the live preview settings, then start (or continue) training; errors become sentences."""
            try:
                engine.set_preview_settings(band, gamma)
                return launch(**mode)
            except (ValueError, RuntimeError) as exc:  # ConfigError is a ValueError
                raise views.user_error(exc) from None

        async def stream_background(engine: Engine):
            """Local / GPU server: a background thread trains; this streams its snapshots."""
            last: dict[str, Any] = {}
            version, position, sent = -1, None, 0.0
            while True:
                snapshot = await asyncio.to_thread(engine.wait_for_change, version, 0.5)
                if snapshot.version != version or snapshot.queue_position != position:
                    if snapshot.active and time.monotonic() - sent < STREAM_MIN_INTERVAL_S:
                        await asyncio.sleep(STREAM_MIN_INTERVAL_S)  # rate limit only; state is re-read below
                        snapshot = engine.snapshot()
                    version, position, sent = snapshot.version, snapshot.queue_position, time.monotonic()
                    yield render(snapshot, last)
                if not snapshot.active:
                    return

        def stream_foreground(snapshots):
            """ZeroGPU: no thread may hold the GPU, so the request itself drives GPU calls in chunks."""
            last: dict[str, Any] = {}
            sent = 0.0
            for snapshot in snapshots:
                if not snapshot.active or time.monotonic() - sent >= STREAM_MIN_INTERVAL_S:
                    sent = time.monotonic()
                    yield render(snapshot, last)

        async def on_train(n_steps, lr_, batch, seed_, t_lo, t_hi, te_w, te_b, every, cgdr_w, lo, hi, gamma, request: gr.Request):
            engine = engine_for(request)
            values = [n_steps, lr_, batch, seed_, t_lo, t_hi, te_w, te_b, every, cgdr_w]
            begin(engine, lambda: engine.start(overrides_from(values)), interval(lo, hi), views.as_number(gamma, 'The tandem balance'))
            async for outputs in stream_background(engine):
                yield outputs

        def on_train_zero_gpu(n_steps, lr_, batch, seed_, t_lo, t_hi, te_w, te_b, every, cgdr_w, lo, hi, gamma, request: gr.Request):
            engine = engine_for(request)
            values = [n_steps, lr_, batch, seed_, t_lo, t_hi, te_w, te_b, every, cgdr_w]
            yield from stream_foreground(begin(
                engine, lambda **mode: engine.start(overrides_from(values), **mode), interval(lo, hi), views.as_number(gamma, 'The tandem balance'),
                foreground=True, gpu_call=GPU_TRAINING_CHUNK,
            ))

        async def on_continue(n_steps, lo, hi, gamma, request: gr.Request):
            engine = engine_for(request)
            begin(engine, lambda: engine.continue_training(views.as_number(n_steps, 'The number of extra steps', whole=True)), interval(lo, hi), views.as_number(gamma, 'The tandem balance'))
            async for outputs in stream_background(engine):
                yield outputs

        def on_continue_zero_gpu(n_steps, lo, hi, gamma, request: gr.Request):
            engine = engine_for(request)
            yield from stream_foreground(begin(
                engine, lambda **mode: engine.continue_training(views.as_number(n_steps, 'The number of extra steps', whole=True), **mode), interval(lo, hi), views.as_number(gamma, 'The tandem balance'),
                foreground=True, gpu_call=GPU_TRAINING_CHUNK,
            ))

        def on_stop(request: gr.Request):
            engine = engine_for(request)
            engine.stop()
            try:
                snapshot = engine.wait_until(lambda s: not s.active, timeout=120)
            except TimeoutError:
                snapshot = engine.snapshot()
            return render(snapshot)

        def on_pause(request: gr.Request):
            engine_for(request).pause()
            return views.status_markdown(engine_for(request).snapshot())

        def on_resume(request: gr.Request):
            engine_for(request).resume()
            return views.status_markdown(engine_for(request).snapshot())

        def rerender(lo: float, hi: float, gamma: float, request: gr.Request, *, quiet: bool) -> list[Any]:
            """Previews at these slider values (they also become the live training-preview settings).

            quiet (slider moves, imports): nothing to preview yet is no error, a bad interval a warning.
            """
            engine = engine_for(request)
            try:
                engine.render_previews(interval(lo, hi), views.as_number(gamma, 'The tandem balance'))
            except NoConceptYet as exc:
                if quiet:
                    return [gr.skip()] * len(live_outputs)
                raise views.user_error(exc) from None
            except (ValueError, RuntimeError) as exc:
                if not quiet:
                    raise views.user_error(exc) from None
                gr.Warning(str(exc))
                return [gr.skip()] * len(live_outputs)
            return render(engine.snapshot())

        @spaces.GPU(duration=GPU_DURATION_S)
        def on_preview(lo: float, hi: float, gamma: float, request: gr.Request):
            return rerender(lo, hi, gamma, request, quiet=False)

        @spaces.GPU(duration=GPU_DURATION_S)
        def on_slider(lo: float, hi: float, gamma: float, request: gr.Request):
            return rerender(lo, hi, gamma, request, quiet=True)

        @spaces.GPU(duration=GPU_DURATION_S)
        def on_generate(text, neg, seed_, n_steps, cfg_scale, sched, count, lo, hi, gamma, request: gr.Request,
                        progress=gr.Progress()):
            engine = engine_for(request)
            if seed_ is None:
                raise gr.Error("Fill in a seed (a whole number) to generate.", print_exception=False)
            try:
                result = engine.generate(
                    text, negative_prompt=neg or "",
                    seeds=[views.as_number(seed_, "The seed", whole=True) + i for i in range(images_wanted(count))],
                    num_inference_steps=views.as_number(n_steps, "The number of steps", whole=True),
                    guidance_scale=views.as_number(cfg_scale, "The guidance scale"), scheduler=sched,
                    band=interval(lo, hi), balance=views.as_number(gamma, "The tandem balance"),
                    progress=lambda done, total: progress((done, total), desc="Denoising"),
                )
            except (ValueError, RuntimeError) as exc:
                raise views.user_error(exc) from None
            return views.generated_items(result)

        def on_export(request: gr.Request):
            engine = engine_for(request)
            snapshot = engine.snapshot()
            folder = sessions.folder(request.session_hash or "anonymous")  # deleted with the session
            try:
                path = engine.export_concept(folder / f"personamagic-concept-step{snapshot.step}.safetensors")
            except (ValueError, OSError) as exc:
                raise views.user_error(exc) from None
            return str(path), f"✓ Exported `{path.name}`."

        def on_import(file: str | None, request: gr.Request):
            if not file:
                return gr.skip(), gr.skip()
            engine = engine_for(request)
            sessions.own(request.session_hash or "anonymous", file)
            try:
                concept = engine.import_concept(file)
            except (ValueError, OSError, RuntimeError) as exc:
                gr.Warning(str(exc))
                return f"✗ {exc}", views.status_markdown(engine.snapshot())
            note = f"✓ Loaded a concept ({concept.num_tokens} tokens, {concept.steps_done} steps, super-category “{concept.super_category}”)."
            return note, views.status_markdown(engine.snapshot())

        def on_preset(name: str, request: gr.Request):
            engine = engine_for(request)
            try:
                new_cfg = load_preset(name)
                engine.configure(new_cfg)
            except (ConfigError, RuntimeError) as exc:
                raise views.user_error(exc) from None
            t, s = new_cfg.train, new_cfg.sample
            return [
                _banner_update(new_cfg.model.source), new_cfg.model.source, new_cfg.model.image_encoder or "", t.steps, t.lr,
                t.batch_size, t.seed, t.band[0], t.band[1], t.te_weight, t.te_balance, t.preview_every, t.cgdr_weight,
                s.band[0], s.band[1], s.balance,
            ]

        def on_model_source(source: str, encoder: str, request: gr.Request):
            """Check the chosen model at once (files, architecture, image encoder), then load it: the
            noise banner stays until a real model has loaded, and the note says which one did."""
            from studio.weights import check

            engine = engine_for(request)
            model = {"model.source": source.strip(), "model.image_encoder": encoder.strip() or None}
            if model == {"model.source": engine.cfg.model.source, "model.image_encoder": engine.cfg.model.image_encoder}:
                return gr.skip(), gr.skip()
            try:
                cfg = engine.cfg.replace(**model)
                check(cfg.model)
                engine.configure(cfg)
                backbone = engine.backbone()
            except (ConfigError, RuntimeError) as exc:  # BackboneUnavailable is a RuntimeError
                raise views.user_error(exc) from None
            notes = "".join(f"  \n*{note}*" for note in backbone.notes)
            return _banner_update(backbone.source), f"✓ Loaded {backbone.describe()}.{notes}"

        # ---------------------------------------------------------------- wiring
        photos.change(on_photos, [photos], [crops, photo_report], api_name="photos")
        chunked = chunked_training()
        train_event = train_btn.click(
            on_train_zero_gpu if chunked else on_train, [*settings, band_lo, band_hi, balance], live_outputs,
            api_name="train", concurrency_limit=None,
        )
        continue_event = continue_btn.click(
            on_continue_zero_gpu if chunked else on_continue, [steps, band_lo, band_hi, balance], live_outputs,
            api_name="continue", concurrency_limit=None,
        )
        stop_btn.click(
            on_stop, None, live_outputs, cancels=[train_event, continue_event], api_name="stop", concurrency_limit=None
        )
        pause_btn.click(on_pause, None, [status], api_name="pause", concurrency_limit=None)
        resume_btn.click(on_resume, None, [status], api_name="resume", concurrency_limit=None)
        preview_btn.click(on_preview, [band_lo, band_hi, balance], live_outputs, api_name="preview", concurrency_limit=None)
        gr.on(
            [band_lo.release, band_hi.release, balance.release], on_slider, [band_lo, band_hi, balance], live_outputs,
            trigger_mode="always_last", api_name="sliders", concurrency_limit=None,
        )
        generate_btn.click(
            on_generate, [prompt, negative, gen_seed, gen_steps, guidance, scheduler, num_images, band_lo, band_hi, balance],
            [generated], api_name="generate", concurrency_limit=None,
        )
        export_btn.click(on_export, None, [export_file, concept_msg], api_name="export", concurrency_limit=None)
        import_file.upload(on_import, [import_file], [concept_msg, status], api_name="import", concurrency_limit=None).then(
            on_slider, [band_lo, band_hi, balance], live_outputs, concurrency_limit=None  # show the imported concept
        )
        preset.change(
            on_preset, [preset],
            [banner, model_source, image_encoder, *settings, band_lo, band_hi, balance], api_name="preset",
        )
        model_source.submit(on_model_source, [model_source, image_encoder], [banner, model_note], api_name="model_source")
        image_encoder.submit(on_model_source, [model_source, image_encoder], [banner, model_note], api_name="image_encoder")
        def on_unload(request: gr.Request):
            sessions.close(request.session_hash or "anonymous")

        def on_keepalive(request: gr.Request):  # an open tab is a live session, even when idle
            sessions.touch(request.session_hash or "anonymous")

        gr.Timer(KEEPALIVE_S).tick(on_keepalive, None, None, api_visibility="private", queue=False)
        demo.unload(on_unload)
    return demo
