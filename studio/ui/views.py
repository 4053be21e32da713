"""Pure functions from engine snapshots to what the page shows (text, tables, gallery items)."""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from studio.engine import Phase, Snapshot
from studio.errors import FormError, user_message

MAX_PLOT_POINTS = 400
SMOOTHING = 0.9  # EMA factor of the smoothed loss curve

TINY_BANNER = (
    "⚠️ **Demo model: images are noise.** This studio is running the `tiny` backbone — small "
    "random-weight networks with the Stable Diffusion 1.x shape — so training, previews and sliders "
    "work, but the pictures carry no likeness. For real results run with real weights, e.g. "
    "`python app.py --preset sd15` (hub id, a local diffusers folder or a single `.safetensors` file)."
)

TOY_BANNER = (
    "**Toy world.** This studio is running the `toy` backbone: a small Stable-Diffusion-shaped model "
    "pretrained on this project's procedural world of 64 px cartoon portraits, with its own face detector, "
    "identity encoder and attribute classifiers as the scores. Real photos are out of its world — use the "
    "sample toy selfies below, and prompts in its vocabulary (settings such as *on a beach*, *in a forest*; "
    "*wearing a red hat / crown / beanie*, *glasses / sunglasses*, *smiling / surprised*, *an oil painting / "
    "pencil sketch / pixel art / watercolor of*). For real faces run with real weights, e.g. "
    "`python app.py --preset sd15`."
)


def banner(model_source: str) -> str:
    """The warning shown above the page for a backbone that is not a real image model ("" for real ones)."""
    return {"tiny": TINY_BANNER, "toy": TOY_BANNER}.get(model_source, "")


SLIDER_HELP = {
    "band": "**Identity interval** — denoising steps with *t* in [start, end] see the person; "
    "steps above *end* see only the word, so the prompt sets the layout. Wider = more likeness, "
    "less prompt control.",
    "balance": "**Tandem balance γ** — how strongly the prompt's words attend to the identity tokens: "
    "< 1 favours the prompt (scene, style), > 1 favours the identity.",
}


def user_error(exc: BaseException) -> gr.Error:
    """``exc`` as a gr.Error: a StudioError's own sentence, anything else one generic sentence
    (logged once with its traceback by studio.errors.user_message)."""
    return gr.Error(user_message(exc), print_exception=False)


def as_number(value: Any, what: str, *, whole: bool = False) -> Any:
    """A field's value as a number, or a gr.Error naming the field: text, NaN or infinity sent
    through the API get a sentence instead of Python's conversion message."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise user_error(FormError(f"{what} must be a number, got {str(value)[:40]!r}.")) from None
    if not math.isfinite(number):
        raise user_error(FormError(f"{what} must be a finite number, got {value!r}."))
    if not whole:
        return number
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, however large (the settings check the range)
    if number != int(number):
        raise user_error(FormError(f"{what} must be a whole number, got {value!r}."))
    return int(number)


def loss_frame(snapshot: Snapshot) -> pd.DataFrame | None:
    """Raw and EMA-smoothed loss as a long frame (step, loss, series), at most ~400 points per series.

    None before the first step: Gradio's plot fixes its colour domain from the first frame it
    draws, so that frame must already hold both series.
    """
    points = snapshot.losses
    if not points:
        return None
    smoothed, ema = [], None
    for p in points:
        ema = p.loss if ema is None else SMOOTHING * ema + (1 - SMOOTHING) * p.loss
        smoothed.append(ema)
    stride = max(1, math.ceil(len(points) / MAX_PLOT_POINTS))
    keep = list(range(0, len(points), stride))
    if keep[-1] != len(points) - 1:
        keep.append(len(points) - 1)
    steps = [points[i].step for i in keep]
    return pd.DataFrame(
        {
            "step": steps + steps,
            "loss": [points[i].loss for i in keep] + [smoothed[i] for i in keep],
            "series": ["loss"] * len(keep) + ["smoothed"] * len(keep),
        }
    )


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def status_markdown(snapshot: Snapshot) -> str:
    """One status block: phase, step / total, speed, ETA, place in line, last notice."""
    phase = snapshot.phase
    label = phase.value.capitalize()
    if phase is Phase.IDLE and snapshot.concept is not None:
        label = "Ready"  # an imported concept: nothing trained here, but images can be made
    parts = [f"**{label}**"]
    if snapshot.total:
        parts.append(f"step {snapshot.step} / {snapshot.total}")
    if snapshot.steps_per_second and phase in (Phase.TRAINING, Phase.PAUSED):
        parts.append(f"{snapshot.steps_per_second:.2f} steps/s")
        parts.append(f"ETA {_duration(snapshot.eta_seconds)}")
    if snapshot.losses:
        last = snapshot.losses[-1]
        parts.append(f"loss {last.loss:.4f}")
        if last.attention_balance is not None:
            parts.append(f"identity attention share ā {last.attention_balance:.2f}")
    if snapshot.queue_position:
        parts.append(f"waiting for the GPU: {snapshot.queue_position} ahead in line")
    if snapshot.backbone:
        parts.append(f"model: {snapshot.backbone}")
    text = " · ".join(parts)
    if snapshot.best_note:
        text += f"\n\n{snapshot.best_note}"
    if snapshot.message:
        text += f"\n\n{snapshot.message}"
    return text


def preview_items(snapshot: Snapshot) -> list[tuple]:
    """Gallery items (image, caption) of the latest preview."""
    preview = snapshot.preview
    if preview is None:
        return []
    items = []
    for i, (image, caption) in enumerate(zip(preview.images, preview.captions)):
        score = preview.scores[i] if i < len(preview.scores) else None
        text = f"step {preview.step} · {caption} · t∈[{preview.band[0]}, {preview.band[1]}] · γ={preview.balance:g}"
        if score is not None:
            text += f" · {score.caption}"
        items.append((image, text))
    return items


def generated_items(result) -> list[tuple]:
    """Gallery items (image, caption): prompt, seed, scores and the settings that made it."""
    items = []
    for image, caption, setting in zip(result.images, result.captions, result.settings):
        lo, hi = setting["band"]
        items.append((image, (
            f"{caption} · {setting['num_inference_steps']} steps {setting['scheduler']} · CFG {setting['guidance_scale']:g}"
            f" · t∈[{lo}, {hi}]: identity in {setting['identity_steps']} of {setting['total_steps']} steps"
            f" · γ={setting['balance']:g}"
        )))
    return items


def photo_items(prepared, folder: Path | None = None) -> list[tuple]:
    """Gallery items: each usable crop with its mask overlay. With ``folder`` (the session's own,
    inside Gradio's cache) the crops are written there, so they are served from it and go with it."""
    if prepared is None:
        return []
    items = []
    for index, photo in enumerate(prepared.photos):
        image: Any = photo.mask_overlay()
        if folder is not None:
            path = folder / f"crop-{uuid.uuid4().hex[:12]}-{index}.png"
            image.save(path)
            image = str(path)
        items.append((image, f"{photo.name} ({prepared.backend})"))
    return items


def photo_report(prepared) -> str:
    """Markdown: backend, one line per photo (ok / problem, warnings), outliers."""
    if prepared is None:
        return ""
    lines = [f"Face backend: **{prepared.backend}** · {len(prepared.photos)} of {len(prepared.reports)} photos usable"]
    for report in prepared.reports:
        if report.ok:
            line = f"- ✓ {report.name}"
            if report.warnings:
                line += " — " + "; ".join(report.warnings)
        else:
            line = f"- ✗ {report.name} — {report.error}"
        lines.append(line)
    return "\n".join(lines)
