"""The Compose tab: two people in one picture, and an instant likeness from the photos (docs/COMPOSE.md).

One builder (``build_compose_tab``); the handlers only turn widget values into
``studio.compose.PersonSource``s and render what ``Engine.compose`` returns.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import spaces

from studio.compose import PersonSource, side_boxes
from studio.config import StudioConfig
from studio.engine import Engine
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
LAYOUTS = {"Found from the picture's attention": None, "Left / right": "left-right"}

EXPLAIN = (
    "Put **two people** in one picture: each is a trained concept (this session's or a file) and/or a photo. "
    "Write `{0}` and `{1}` in the prompt where they go. After a short layout stage with class words only, each "
    "person's region (shown as a coloured overlay) sees only their own tokens and photo. "
    "**Instant preview** shows a likeness from this session's photo before any training."
)


def cost_text(sources: list[str], rsa_weight: float) -> str:
    """What a composition costs, in UNet passes per denoising step."""
    photos = sum(SOURCES.get(label, "") in ("session+photo", "photos", "photo") for label in sources)
    passes = 1 + (photos if rsa_weight > 0 else 0)
    note = f"{passes} UNet pass{'es' if passes > 1 else ''} per step"
    if photos and rsa_weight > 0:
        note += f" (1 + {photos} for the photo{'s' if photos > 1 else ''}: about {passes}× a plain generation)"
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


def build_compose_tab(engine_for: Callable[[gr.Request], Engine], cfg: StudioConfig) -> None:
    """The tab's widgets and handlers; call inside ``with gr.Tab("Compose"):``."""
    gr.Markdown(EXPLAIN, elem_classes=["help"])
    people = []
    with gr.Row():
        for index, default in enumerate(("This session's concept", "A concept file")):
            with gr.Column():
                kind = gr.Radio(list(SOURCES), value=default, label=f"Person {{{index}}}", elem_id=f"compose-kind-{index}")
                file = gr.File(label=f"Concept file or photo for {{{index}}}", file_types=[".safetensors", "image"],
                               type="filepath", elem_id=f"compose-file-{index}")
                people.append((kind, file))
    with gr.Row():
        prompt = gr.Textbox("a photo of {0} and {1} on a beach", label="Prompt ({0}, {1} = the people)",
                            elem_id="compose-prompt", scale=3)
        layout = gr.Radio(list(LAYOUTS), value="Found from the picture's attention", label="Regions", scale=2)
    with gr.Row():
        seed = gr.Number(0, precision=0, label="Seed")
        steps = gr.Slider(1, 100, value=cfg.sample.steps, step=1, label="Steps", elem_id="compose-steps")
        mode = gr.Radio(["regions", "naive"], value="regions", label="Mode (naive = all tokens in one prompt, for comparison)")
    cost = gr.Markdown(cost_text(["This session's concept", "A concept file"], cfg.compose.rsa_weight), elem_id="compose-cost")
    with gr.Row():
        compose_btn = gr.Button("Compose", variant="primary", elem_id="compose")
        instant_btn = gr.Button("Instant preview (my photo, no training)", elem_id="instant-preview")
    with gr.Row():
        images = gr.Gallery(label="Composed", columns=2, height=320, elem_id="composed", interactive=False, object_fit="contain")
        overlays = gr.Gallery(label="Regions used", columns=2, height=320, elem_id="compose-regions", interactive=False,
                              object_fit="contain")
    scores = gr.Markdown(elem_id="compose-scores")

    def sources_from(values: list[Any]) -> list[PersonSource]:
        found = []
        for index in range(0, len(values), 2):
            label, path = values[index], values[index + 1]
            found.append(PersonSource(SOURCES.get(label, str(label)), path or None))
        return found

    def rendered(result, region_scores, count: int):
        items = [(image, caption) for image, caption in zip(result.images, result.captions)]
        regions = [(overlay, f"seed {s['seed']}") for overlay, s in zip(result.overlays, result.settings)]
        passes = result.settings[0]["unet_passes_per_step"]
        return items, regions, score_text(region_scores, count) + f"\n\nThis run: {passes} UNet pass{'es' if passes > 1 else ''} per step."

    @spaces.GPU(duration=GPU_DURATION_S)
    def on_compose(kind0, file0, kind1, file1, text, layout_label, seed_, n_steps, mode_, request: gr.Request,
                   progress=gr.Progress()):
        engine = engine_for(request)
        sources = sources_from([kind0, file0, kind1, file1])
        boxes = side_boxes(len(sources)) if LAYOUTS.get(layout_label) == "left-right" else None
        try:
            result, region_scores = engine.compose(
                sources, text, mode=mode_, boxes=boxes,
                seeds=[views.as_number(seed_, "The seed", whole=True)],
                num_inference_steps=views.as_number(n_steps, "The number of steps", whole=True),
                progress=lambda done, total: progress((done, total), desc="Composing"),
            )
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return rendered(result, region_scores, len(sources))

    @spaces.GPU(duration=GPU_DURATION_S)
    def on_instant(seed_, n_steps, request: gr.Request, progress=gr.Progress()):
        engine = engine_for(request)
        try:
            result, region_scores = engine.instant_preview(
                seeds=[views.as_number(seed_, "The seed", whole=True)],
                num_inference_steps=views.as_number(n_steps, "The number of steps", whole=True),
                progress=lambda done, total: progress((done, total), desc="Instant preview"),
            )
        except (ValueError, RuntimeError) as exc:
            raise views.user_error(exc) from None
        return rendered(result, region_scores, 1)

    inputs = [people[0][0], people[0][1], people[1][0], people[1][1]]
    compose_btn.click(on_compose, [*inputs, prompt, layout, seed, steps, mode], [images, overlays, scores])
    instant_btn.click(on_instant, [seed, steps], [images, overlays, scores])
    for kind, _ in people:
        kind.change(lambda a, b: cost_text([a, b], cfg.compose.rsa_weight), [people[0][0], people[1][0]], cost)
