"""The Compose tab: two people in one picture, and an instant likeness from the photos (docs/COMPOSE.md).

One builder (``build_compose_tab``) over a layout and its handlers; the handlers only turn widget values into
``studio.compose.PersonSource``s and render what ``Engine.compose`` returns.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import spaces
from gradio.components.base import server
from PIL import Image, UnidentifiedImageError

from studio.compose import REGION_COLOURS, PersonSource, boxes_from_strokes, check_template, side_boxes
from studio.config import StudioConfig
from studio.engine import Engine
from studio.sampler import GenerationInterrupted
from studio.ui import views

GPU_DURATION_S = 180  # ZeroGPU: the most one composition may hold the GPU

# shown label -> PersonSource kind
SOURCES = {
    "This session's concept": "session",
    "This session's concept + its photo": "session+photo",
    "This session's photo only (no training)": "photos",
    "A concept file": "file",
    "A photo": "photo",
}
FILE_SOURCES = ("file", "photo")  # the sources that need the person's file box


def file_box_shown(kind: str) -> bool:
    """Whether a person's file box is shown for the source ``kind`` (a :data:`SOURCES` label)."""
    return SOURCES.get(kind) in FILE_SOURCES


LAYOUTS = {"Found from the picture's attention": None, "Left / right": "left-right", "Drawn by me": "drawn"}
CANVAS_HEIGHT = 256  # the drawing canvas's height in canvas pixels; its width follows compose.aspect (boxes are fractions)
# What a drawing may be (guard_canvas): pixels by the header, bytes per file, layers, drawings in waiting
MAX_CANVAS_PIXELS = 1024 * 1024
MAX_CANVAS_BYTES = 2_000_000
MAX_CANVAS_LAYERS = 2
MAX_PENDING_DRAWINGS = 32

EXPLAIN = (
    "Put **two people** in one picture: each is a trained concept (this session's or a file) and/or a photo. "
    "Write `{0}` and `{1}` in the prompt where they go. After a short layout stage with class words only, each "
    "person's region (shown as a coloured overlay) sees only their own tokens and photo. "
    "**Instant preview** lets this session's photo steer the picture through reference attention before any "
    "training: the method means it as a first likeness; on the toy model, measured, it changes the picture but "
    "does not carry the person yet."
)


def guard_canvas(editor: gr.ImageEditor) -> gr.ImageEditor:
    """``editor`` hardened for a server shared by strangers (any client may call its endpoints
    with any data; the page sends one PNG layer the canvas's size):

    - an uploaded layer must be a PNG or WebP of at most ``MAX_CANVAS_PIXELS`` by its header,
      checked before any pixel is decoded, and its file at most ``MAX_CANVAS_BYTES``;
    - a drawing has at most ``MAX_CANVAS_LAYERS`` layers (the layer index is the client's);
    - at most ``MAX_PENDING_DRAWINGS`` uploaded drawings wait to be used, over all sessions
      (the oldest is dropped first).

    Installed on the instance, not as a subclass: Gradio writes a ``.pyi`` beside the module of
    every Component subclass it imports, which a read-only deployment cannot.
    """
    stock_accept, stock_convert, stock_preprocess = editor.accept_blobs, editor.convert_and_format_image, editor.preprocess

    @server
    def accept_blobs(data: Any) -> Any:
        index = data.data.get("index")
        if data.data.get("type") == "layer" and index not in (None, "", "null"):
            if not str(index).isdigit() or int(index) >= MAX_CANVAS_LAYERS:
                raise gr.Error(f"A drawing has at most {MAX_CANVAS_LAYERS} layers.")
        if any(len(content) > MAX_CANVAS_BYTES for _, content in data.files):
            raise gr.Error(f"A drawing's layer is at most {MAX_CANVAS_BYTES // 1000} kB.")
        while len(editor.blob_storage) >= MAX_PENDING_DRAWINGS:
            editor.blob_storage.pop(next(iter(editor.blob_storage)), None)
        return stock_accept(data)

    def preprocess(payload: Any) -> Any:
        if payload is not None and len(payload.layers or ()) > MAX_CANVAS_LAYERS:
            raise gr.Error(f"A drawing has at most {MAX_CANVAS_LAYERS} layers.")
        return stock_preprocess(payload)

    def convert_and_format_image(file: Any, flatten_on_white: bool = False) -> Any:
        if file is not None:
            try:
                source = file.path if hasattr(file, "path") else io.BytesIO(file)
                with Image.open(source, formats=("PNG", "WEBP")) as header:  # reads the header only
                    width, height = header.size
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
                raise gr.Error("The drawing is not a PNG the studio can read; clear the canvas and draw again.") from None
            if width * height > MAX_CANVAS_PIXELS:
                raise gr.Error(f"The drawing is {width} x {height} pixels, larger than a canvas can be "
                               f"({MAX_CANVAS_PIXELS:,} pixels); the canvas here is {' x '.join(map(str, editor.canvas_size))}.")
        return stock_convert(file, flatten_on_white)

    editor.accept_blobs, editor.preprocess, editor.convert_and_format_image = accept_blobs, preprocess, convert_and_format_image
    return editor


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def canvas_size(aspect: float) -> tuple[int, int]:
    """(width, height) of the drawing canvas for pictures ``aspect`` times as wide as high."""
    return round(CANVAS_HEIGHT * aspect), CANVAS_HEIGHT


def blank_canvas(size: tuple[int, int]) -> dict[str, Any]:
    """The drawing canvas's empty value: white, ``size`` (width, height), nothing painted."""
    white = np.full((size[1], size[0], 4), 255, np.uint8)
    return {"background": white, "layers": [], "composite": white}


def drawn_layers(value: Any) -> list[Any]:
    """The painted layers (RGBA arrays) of an ImageEditor value; none when nothing was painted."""
    if not isinstance(value, dict):
        return []
    return [layer for layer in value.get("layers") or [] if layer is not None]


def chosen_boxes(layout_label: str, canvas: Any, count: int) -> list[tuple[float, ...]] | None:
    """The boxes of the Regions choice: None (found from attention), side by side, or drawn."""
    layout = LAYOUTS.get(layout_label)
    if layout == "left-right":
        return side_boxes(count)
    if layout == "drawn":
        return boxes_from_strokes(drawn_layers(canvas), count)
    return None


def drawing_visible(layout_label: str, mode: str) -> Any:
    """The canvas shows while regions are to be drawn (and the mode has regions at all)."""
    return gr.update(visible=LAYOUTS.get(layout_label) == "drawn" and mode == "regions")


def regions_for_mode(layout_label: str, mode: str) -> list[Any]:
    """Naive composition places no one: the Regions choice greys out (keeping what was chosen,
    for a switch back) and the canvas hides."""
    info = None if mode == "regions" else "Naive composition has no regions: every pixel sees everyone."
    return [gr.update(interactive=mode == "regions", info=info), drawing_visible(layout_label, mode)]


def cost_text(sources: list[str], rsa_weight: float, aspect: float = 1.0) -> str:
    """What a composition costs, in UNet passes per denoising step, on a picture ``aspect`` times
    as wide as a square one."""
    photos = sum(SOURCES.get(label, "") in ("session+photo", "photos", "photo") for label in sources)
    passes = 1 + (photos if rsa_weight > 0 else 0)
    note = f"{passes} UNet pass{'es' if passes > 1 else ''} per step"
    if photos and rsa_weight > 0:
        note += f" (1 + {photos} for the photo{'s' if photos > 1 else ''}: up to {passes}× a plain generation's time at that size)"
    if aspect != 1.0:
        note += f", on a picture {aspect:g}× as wide as a square one (room for two people side by side; the time grows with the pixels)"
    return f"Cost: {note}."


def score_text(scores: list[list[float | None]] | tuple, count: int) -> str:
    """Markdown: identity similarity of each person's region, per image."""
    if not scores:
        return "Region scores are off in this preset."
    head = "| image | " + " | ".join(f"{{{p}}}" for p in range(count)) + " |"
    lines = [head, "|---" * (count + 1) + "|"]
    for index, row in enumerate(scores):
        cells = ["–" if s is None else f"{s:.3f}" for s in row]
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    lines.append("\nIdentity of each person's region to that person's photos (– : no photos to compare or no face found).")
    return "\n".join(lines)


def run_cost_text(passes: int, size: tuple[int, int]) -> str:
    """What a finished composition cost, from its settings; ``size``: its pictures' (width, height)."""
    picture = f"{size[0]} × {size[1]}"
    if passes == 1:
        return f"This run: 1 UNet pass per step at {picture} (as in a plain generation of that size; finding the regions adds a little)."
    return f"This run: {passes} UNet passes per step at {picture} (up to {passes}× a plain generation's time at that size)."


def _compose_layout(cfg: StudioConfig) -> SimpleNamespace:
    """Every component of the tab, by name."""
    tab = SimpleNamespace(people=[])
    gr.Markdown(EXPLAIN, elem_classes=["help"])
    with gr.Row():
        for index, default in enumerate(("This session's concept", "A concept file")):
            with gr.Column():
                kind = gr.Radio(list(SOURCES), value=default, label=f"Person {{{index}}}", elem_id=f"compose-kind-{index}")
                file = gr.File(label=f"Concept file or photo for {{{index}}}", file_types=[".safetensors", "image"],
                               type="filepath", elem_id=f"compose-file-{index}", visible=file_box_shown(default))
                tab.people.append((kind, file))
    with gr.Row():
        tab.prompt = gr.Textbox("a photo of {0} and {1} on a beach", label="Prompt ({0}, {1} = the people)",
                                elem_id="compose-prompt", scale=3, min_width=300)  # its own line on a phone
        tab.layout = gr.Radio(list(LAYOUTS), value="Found from the picture's attention", label="Regions", scale=2,
                              elem_id="compose-layout")
    with gr.Column(visible=False, elem_id="compose-drawing") as tab.drawing:
        gr.Markdown("Paint **red** over where `{0}` goes and **blue** over `{1}` (the brush's two colours); "
                    "each person's region is the box around their colour.", elem_classes=["help"])
        tab.canvas = guard_canvas(gr.ImageEditor(
            value=blank_canvas(canvas_size(cfg.compose.aspect)), type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False,
            brush=gr.Brush(colors=[_hex(c) for c in REGION_COLOURS[1:3]], default_color=_hex(REGION_COLOURS[1]),
                           color_mode="fixed", default_size=24),
            canvas_size=canvas_size(cfg.compose.aspect), fixed_canvas=True, elem_id="compose-canvas", label="Regions",
        ))
    with gr.Row():
        tab.seed = gr.Number(0, precision=0, label="Seed")
        tab.steps = gr.Slider(1, 100, value=cfg.sample.steps, step=1, label="Steps", elem_id="compose-steps")
        tab.mode = gr.Radio(["regions", "naive"], value="regions", elem_id="compose-mode",
                            label="Mode (naive = all tokens in one prompt, for comparison)")
    tab.cost = gr.Markdown(cost_text(["This session's concept", "A concept file"], cfg.compose.rsa_weight, cfg.compose.aspect),
                           elem_id="compose-cost")
    with gr.Row():
        tab.compose_btn = gr.Button("Compose", variant="primary", elem_id="compose", scale=2,
                                    elem_classes=["busy-toggle"])
        tab.instant_btn = gr.Button("Instant preview (my photo, no training)", elem_id="instant-preview", scale=2,
                                    elem_classes=["busy-toggle"])
        tab.interrupt_btn = gr.Button("Interrupt", variant="stop", elem_id="compose-interrupt", interactive=False,
                                      scale=1, elem_classes=["busy-toggle"])
    with gr.Row():
        tab.images = gr.Gallery(label="Composed", columns=2, height="auto", elem_id="composed", interactive=False,
                                object_fit="contain")
        tab.overlays = gr.Gallery(label="Regions used", columns=2, height="auto", elem_id="compose-regions",
                                  interactive=False, object_fit="contain")
    tab.scores = gr.Markdown(elem_id="compose-scores")
    tab.outputs = [tab.images, tab.overlays, tab.scores, tab.cost]
    return tab


def sources_from(values: list[Any]) -> list[PersonSource]:
    """PersonSources from the widgets' values: (kind label, file) per person, flattened."""
    return [PersonSource(SOURCES.get(values[i], str(values[i])), values[i + 1] or None) for i in range(0, len(values), 2)]


def rendered(result, region_scores, count: int) -> list[Any]:
    """The tab's outputs (images, overlays, scores, cost) for a finished composition."""
    items = [(image, caption) for image, caption in zip(result.images, result.captions)]
    regions = [(overlay, f"seed {s['seed']}") for overlay, s in zip(result.overlays, result.settings)]
    return [items, regions, score_text(region_scores, count),
            run_cost_text(result.settings[0]["unet_passes_per_step"], result.images[0].size)]


def interrupted(exc: GenerationInterrupted) -> list[Any]:
    """The tab's outputs after Interrupt: the last images stay, the scores say what happened."""
    gr.Warning(f"Interrupted: {exc}")
    return [gr.skip(), gr.skip(), f"Interrupted after {exc.step} of {exc.total} steps: nothing new was made.", gr.skip()]


class ComposeHandlers:
    """The tab's handlers; ``engine_for`` gives a request's engine."""

    def __init__(self, engine_for: Callable[[gr.Request], Engine]) -> None:
        self.engine_for = engine_for
        # ZeroGPU: these run in a GPU-attached process (decorated once, at start).
        self.on_compose = spaces.GPU(duration=GPU_DURATION_S)(self._compose)
        self.on_instant = spaces.GPU(duration=GPU_DURATION_S)(self._instant)

    def _compose(self, kind0, file0, kind1, file1, text, layout_label, seed, n_steps, mode, canvas=None,
                 request: gr.Request = None, progress=gr.Progress()) -> list[Any]:
        sources = sources_from([kind0, file0, kind1, file1])
        try:
            # naive mode greys the Regions choice out (regions_for_mode): it places no one
            boxes = chosen_boxes(layout_label, canvas, len(sources)) if mode == "regions" else None
            result, region_scores = self.engine_for(request).compose(
                sources, text, mode=mode, boxes=boxes, seeds=[views.as_number(seed, "The seed", whole=True)],
                num_inference_steps=views.as_number(n_steps, "The number of steps", whole=True),
                progress=lambda done, total: progress((done, total), desc="Composing"),
            )
        except GenerationInterrupted as exc:
            return interrupted(exc)
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return rendered(result, region_scores, len(sources))

    def _instant(self, seed, n_steps, request: gr.Request, progress=gr.Progress()) -> list[Any]:
        try:
            result, region_scores = self.engine_for(request).instant_preview(
                seeds=[views.as_number(seed, "The seed", whole=True)],
                num_inference_steps=views.as_number(n_steps, "The number of steps", whole=True),
                progress=lambda done, total: progress((done, total), desc="Instant preview"),
            )
        except GenerationInterrupted as exc:
            return interrupted(exc)
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return rendered(result, region_scores, 1)

    def expect_composition(self, request: gr.Request) -> None:
        self.engine_for(request).expect_run("composition")

    def on_interrupt(self, request: gr.Request) -> None:
        self.engine_for(request).interrupt_composition()


def build_compose_tab(engine_for: Callable[[gr.Request], Engine], cfg: StudioConfig) -> None:
    """The tab's widgets and handlers; call inside ``with gr.Tab("Compose"):``."""
    tab = _compose_layout(cfg)
    on = ComposeHandlers(engine_for)
    kinds = [kind for kind, _ in tab.people]
    people = [widget for person in tab.people for widget in person]
    buttons = [tab.compose_btn, tab.instant_btn, tab.interrupt_btn]  # while one runs, only Interrupt is usable
    # a prompt that does not name the people is said at the prompt box, before the run starts
    names_the_people = {tab.prompt: lambda prompt: check_template(prompt, len(tab.people), cfg.compose.max_people)}
    for button, handler, inputs, checks in (
        (tab.compose_btn, on.on_compose, [*people, tab.prompt, tab.layout, tab.seed, tab.steps, tab.mode, tab.canvas],
         names_the_people),
        (tab.instant_btn, on.on_instant, [tab.seed, tab.steps], {}),
    ):
        run = views.start_checked(button, checks, buttons, starts=2, on_start=on.expect_composition).then(
            handler, inputs, tab.outputs, api_name="compose" if button is tab.compose_btn else "instant_preview",
        )
        views.afterwards(run, views.while_running(False, starts=2), None, buttons, api_visibility="private", queue=False)
    tab.interrupt_btn.click(on.on_interrupt, None, None, api_name="compose_interrupt", concurrency_limit=None)
    tab.layout.change(drawing_visible, [tab.layout, tab.mode], tab.drawing, api_visibility="private", queue=False)
    tab.mode.change(regions_for_mode, [tab.layout, tab.mode], [tab.layout, tab.drawing], api_visibility="private",
                    queue=False)
    for kind in kinds:
        kind.change(lambda a, b: cost_text([a, b], cfg.compose.rsa_weight, cfg.compose.aspect), kinds, tab.cost)
    for kind, file in tab.people:  # the file box only where the source is a file
        kind.change(lambda k: gr.update(visible=file_box_shown(k)), kind, file, api_visibility="private", queue=False)
