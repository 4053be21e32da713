"""Pure functions from engine snapshots to what the page shows (text, tables, gallery items)."""
from __future__ import annotations

import math
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL.PngImagePlugin import PngInfo

from studio.engine import Phase, Snapshot
from studio.errors import FormError, StudioError, user_message

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


STOP_TIMEOUT_S = 120.0  # how long a Stop endpoint waits for the run to end (a stop lands after the step in flight)

SLIDER_HELP = {
    "band": "**Identity interval** — denoising steps with *t* in [start, end] see the person; "
    "steps above *end* see only the word, so the prompt sets the layout. The method intends a wider "
    "interval to give more likeness and less prompt control; on the toy model, measured, neither "
    "likeness nor the prompt score moved beyond seed noise, so compare previews.",
    "balance": "**Tandem balance γ** — how strongly the picture attends to the identity tokens: "
    "< 1 is meant to favour the prompt (scene, style), > 1 the identity. On the toy model, measured, it "
    "moves the pictures (at 4, by 4–7 of 255 per pixel) but neither likeness nor the prompt score beyond "
    "seed noise, so compare previews.",
}


def error_text(exc: BaseException) -> str:
    """The one sentence a person sees for an error: a StudioError's own sentence, anything else
    one generic sentence (logged once with its traceback by studio.errors.user_message)."""
    return user_message(exc)


def user_error(exc: BaseException) -> gr.Error:
    """An expected error as a plain sentence in the page (no traceback in the server log). It
    stays until closed: a run that fails minutes after its click is read when the user looks back."""
    return gr.Error(error_text(exc), print_exception=False, duration=None)


def field_validator(checks: list[Callable[[Any], Any]]) -> Callable[..., Any]:
    """A Gradio ``validator=`` whose i-th check checks the event's i-th input and raises a
    StudioError, whose sentence (error_text) then shows at that input. One verdict per input;
    for a single input the verdict itself (Gradio wraps a lone output's value in a list)."""
    def validate(*values: Any) -> Any:
        verdicts = []
        for check, value in zip(checks, values):
            try:
                check(value)
                verdicts.append(gr.validate(True, ""))
            except StudioError as exc:
                verdicts.append(gr.validate(False, error_text(exc)))
        return verdicts[0] if len(verdicts) == 1 else verdicts

    return validate


def start_checked(button: gr.Button, checks: dict[Any, Callable[[Any], Any]], buttons: list[Any], starts: int,
                  on_start: Callable[[gr.Request], None] | None = None) -> Any:
    """``button``'s first step: each component in ``checks`` is checked (its sentence shows at the
    component), then the run's buttons turn to running (while_running). Chain the run with
    ``.then``: a refused input stops the chain before any button changes or any output is
    touched. Only the checked components are sent (an upload is read once, by the run). Gradio
    checks inputs only on queued events, so a checked first step is queued, with no concurrency
    limit; API callers call the run's own step, where the engine refuses the same input.

    ``on_start(request)`` runs in the step that turns the buttons, before an Interrupt can be
    clicked (Engine.expect_run, so that an Interrupt clicked before the run begins still stops it).
    """
    running = while_running(True, starts)

    def first_step(request: gr.Request, *_values: Any) -> list[Any]:
        if on_start is not None:
            on_start(request)
        return running()

    if not checks:
        return button.click(first_step, None, buttons, api_visibility="private", queue=False)
    return button.click(first_step, list(checks), buttons, validator=field_validator(list(checks.values())),
                        api_visibility="private", concurrency_limit=None, show_progress="hidden")


def while_running(running: bool, starts: int) -> Callable[[], list[Any]]:
    """Button states around a run: the first ``starts`` buttons start one (off while it runs),
    the last one interrupts it (on only while it runs)."""
    return lambda: [gr.update(interactive=not running)] * starts + [gr.update(interactive=running)]


def afterwards(event: Any, fn: Callable[..., Any], inputs: Any, outputs: Any, **kwargs: Any) -> None:
    """Run ``fn`` after ``event`` whether its handler returned or raised.

    Gradio 6's page runs a ``.then`` step only after a handler that returned (an error skips
    it) and a ``.failure`` step only after one that raised; registering both makes ``fn`` a
    ``finally``: a refused run gives its buttons back too.
    """
    event.then(fn, inputs, outputs, **kwargs)
    event.failure(fn, inputs, outputs, **kwargs)


# The command buttons whose state follows the session's phase, in the order the page lists them.
CONTROLS = ("train", "continue", "pause", "resume", "stop", "preview", "best")


def controls(snapshot: Snapshot) -> dict[str, bool]:
    """Which buttons are usable in this snapshot's phase."""
    busy = snapshot.active
    has_photos = snapshot.prepared is not None and bool(snapshot.prepared.photos)
    return {
        "train": not busy and has_photos,
        "continue": not busy and snapshot.can_continue,
        "pause": snapshot.phase is Phase.TRAINING,
        "resume": snapshot.phase is Phase.PAUSED,
        "stop": busy,
        "preview": snapshot.phase is not Phase.LOADING and (
            snapshot.concept is not None or (snapshot.live_weights and snapshot.phase in (Phase.TRAINING, Phase.PAUSED))),
        "best": not busy and snapshot.best_concept_step is not None,
    }


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
    has_photos = snapshot.prepared is not None and bool(snapshot.prepared.photos)
    if phase is Phase.IDLE and snapshot.concept is not None:
        label = "Ready"  # an imported concept: nothing trained here, but images can be made
    elif phase is Phase.IDLE and has_photos:
        label = "Ready to train"
    parts = [f"**{label}**"]
    if phase is Phase.IDLE and not has_photos and snapshot.concept is None:
        parts.append("add a photo to begin")
    if snapshot.total:
        parts.append(f"step {snapshot.step} / {snapshot.total}")
    if snapshot.steps_per_second and phase is Phase.TRAINING:  # no ETA while paused: it is not counting
        parts.append(f"{snapshot.steps_per_second:.2f} steps/s")
        parts.append(f"ETA {_duration(snapshot.eta_seconds)}")
    if snapshot.losses:
        last = snapshot.losses[-1]
        parts.append(f"loss {last.loss:.4f}")
        if last.attention_balance is not None:
            parts.append(f"identity attention share ā {last.attention_balance:.2f}")
    if snapshot.queue_position:
        parts.append(f"waiting: {snapshot.queue_position} ahead in line")
    if snapshot.backbone:
        parts.append(f"model: {snapshot.backbone}")
    # one paragraph, notes on lines of their own: the status keeps a steady, small height
    return "  \n".join([" · ".join(parts), *(note for note in (snapshot.best_note, snapshot.message) if note)])


def preview_items(snapshot: Snapshot) -> list[tuple]:
    """Gallery items (image, caption) of the latest preview."""
    preview = snapshot.preview
    if preview is None:
        return []
    items = []
    for i, (image, caption) in enumerate(zip(preview.images, preview.captions)):
        score = preview.scores[i] if i < len(preview.scores) else None
        text = f"step {preview.step} · {caption} · t∈[{preview.band[0]}, {preview.band[1]}] · γ={preview.balance:g}"
        if score is not None:  # first: the gallery cuts a long caption short, and the scores are what is compared
            text = f"{score.caption} · {text}"
        items.append((image, text))
    return items


def generated_items(result, trained_steps: int, folder: Path | None = None, model: str = "") -> list[tuple]:
    """Gallery items (image, caption): prompt, seed, scores, the training step and the settings
    that made it. With ``folder`` each image is saved there as a PNG carrying its settings in the
    ``parameters`` text chunk (as the A1111 web UI writes them), and the item is that file."""
    items = []
    for index, (image, caption, setting) in enumerate(zip(result.images, result.captions, result.settings)):
        lo, hi = setting["band"]
        text = (
            f"{caption} · concept of training step {trained_steps} · {setting['num_inference_steps']} steps "
            f"{setting['scheduler']} · CFG {setting['guidance_scale']:g}"
            f" · t∈[{lo}, {hi}]: identity in {setting['identity_steps']} of {setting['total_steps']} steps"
            f" · γ={setting['balance']:g}"
        )
        if folder is not None:
            path = folder / f"image-{uuid.uuid4().hex[:12]}-{index}.png"
            info = PngInfo()
            info.add_text("parameters", png_parameters(setting, image.size, trained_steps, model))
            image.save(path, pnginfo=info)
            image = str(path)
        items.append((image, text))
    return items


def png_parameters(setting: dict[str, Any], size: tuple[int, int], trained_steps: int, model: str) -> str:
    """A1111-style generation parameters: prompt, negative prompt line, then key: value pairs."""
    lo, hi = setting["band"]
    pairs = {
        "Steps": setting["num_inference_steps"], "Sampler": setting["scheduler"], "CFG scale": f"{setting['guidance_scale']:g}",
        "Seed": setting.get("seed", ""), "Size": f"{size[0]}x{size[1]}", "Model": model,
        "Identity interval": f"{lo}-{hi}", "Tandem balance": f"{setting['balance']:g}", "Concept step": trained_steps,
    }
    text = str(setting.get("prompt", ""))
    if setting.get("negative_prompt"):
        text += f"\nNegative prompt: {setting['negative_prompt']}"
    return text + "\n" + ", ".join(f"{key}: {value}" for key, value in pairs.items())


def zip_of(paths: list[str], folder: Path) -> str | None:
    """One .zip of ``paths`` in ``folder`` (the download-all file), or None when there are none."""
    if not paths:
        return None
    target = folder / f"images-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(target, "w") as archive:
        for path in paths:
            archive.write(path, Path(path).name)
    return str(target)


OTHER_PERSON = "⚠ may be another person"


def photo_items(pool, chosen=None, folder: Path | None = None) -> list[tuple]:
    """Gallery items: each usable crop with its mask overlay; a photo that may show another person
    and one left out say so in their caption. With ``folder`` (the session's own, inside Gradio's
    cache) the crops are written there, so they are served from it and go with it."""
    if pool is None:
        return []
    used = {photo.name for photo in (chosen or pool).photos}
    items = []
    for index, photo in enumerate(pool.photos):
        image: Any = photo.mask_overlay()
        if index in pool.outliers:
            image = _framed(image)
        if folder is not None:
            path = folder / f"crop-{uuid.uuid4().hex[:12]}-{index}.png"
            image.save(path)
            image = str(path)
        notes = [OTHER_PERSON] if index in pool.outliers else []
        if photo.name not in used:
            notes.append("left out")
        items.append((image, " · ".join([f"{photo.name} ({pool.backend})", *notes])))
    return items


def _framed(image):
    """The crop with a thick amber frame: marked in the gallery, not only in text."""
    from PIL import ImageOps

    side = max(4, image.width // 24)
    inner = image.resize((image.width - 2 * side, image.height - 2 * side))
    return ImageOps.expand(inner, border=side, fill=(217, 119, 6))


def photo_choices(pool, chosen) -> tuple[list[tuple[str, str]], list[str]]:
    """CheckboxGroup (choices, value) of the usable photos: outliers named as such and unticked."""
    if pool is None:
        return [], []
    choices = [(f"{photo.name} — {OTHER_PERSON}" if i in pool.outliers else photo.name, photo.name)
               for i, photo in enumerate(pool.photos)]
    return choices, [photo.name for photo in chosen.photos] if chosen is not None else []


def photo_report(prepared, chosen=None) -> str:
    """Markdown: backend, one line per photo (ok / problem, warnings), outliers, and whether each
    outlier is trained on (it is in ``chosen``, the photos training uses) or left out."""
    if prepared is None:
        return ""
    lines = [f"Face backend: **{prepared.backend}** · {len(prepared.photos)} of {len(prepared.reports)} photos usable"]
    used = {photo.name for photo in chosen.photos} if chosen is not None else set()
    if chosen is not None and len(used) != len(prepared.photos):
        lines[0] += f" · {len(used)} trained on"
    outliers = {prepared.photos[i].name for i in prepared.outliers}
    for report in prepared.reports:
        if report.ok:
            mark = "⚠" if report.name in outliers else "✓"
            line = f"- {mark} {report.name}"
            if report.name in outliers and report.name in used:
                line += " — trained on (ticked below): untick it to leave it out"
            elif report.name in outliers:
                line += " — left out of training unless you tick it below"
            if report.warnings:
                line += " — " + " ".join(w if w.endswith(".") else w + "." for w in report.warnings)
        else:
            line = f"- ✗ {report.name} — {report.error}"
        lines.append(line)
    return "\n".join(lines)
