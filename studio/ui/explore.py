"""The Explore tab: sweep identity interval × tandem balance, see the trade-off, adopt a setting (docs/ALGORITHM.md, "Evaluation").

The handlers are thin (``build_explore_tab``); everything shown is made by the pure functions
above it from ``studio.sweep.SweepPoint``s, so it can be tested without a browser.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd
import spaces

from studio.conditioning import PromptError, check_prompt
from studio.config import check_band
from studio.engine import Engine
from studio.errors import FormError
from studio.metrics import caption
from studio.sweep import (
    EVAL_PROMPTS_FILE,
    SweepPoint,
    SweepSnapshot,
    grid_image,
    pick_balanced,
    read_prompt_file,
    setting_label,
)
from studio.ui import views

EXPLAIN = (
    "A **sweep** renders the same prompts and seeds once per *identity interval × tandem balance*, "
    "scores every image for **identity** (face backend vs your photos) and **prompt fidelity** (CLIP), "
    "and plots one point per setting — so you can see the trade-off and adopt the setting you like."
)
BAND_CHOICES = [(200, 800), (400, 800), (600, 900), (300, 700)]
BANDS_PRESELECTED = [(200, 800), (400, 800)]
BALANCE_CHOICES = [0.5, 0.75, 1.0, 1.5, 2.0]
BALANCES_PRESELECTED = [1.0, 1.5]
MAX_PROMPTS = 8
MAX_SEEDS = 8
GPU_DURATION_S = 120  # ZeroGPU: the most one sweep may hold the GPU

# Series (colours) of the scatter plot: the outcome of each setting; the setting itself is in
# the tooltip. Gradio 6.31 fixes a plot's colour domain when it first draws it and draws
# points of later series without colour, so every frame carries one blank (NaN) row per
# series: all four are in the domain and the legend from the start.
SCORED = "identity scored"
BEST = "★ best balance"
NO_FACE = "no face found"
NO_REFERENCE = "face, no photo to compare"
SERIES_COLORS = {SCORED: "#2563eb", BEST: "#dc2626", NO_FACE: "#9ca3af", NO_REFERENCE: "#d97706"}
PLOT_HEIGHT = 320  # pixels; one more while the plot has points (see plot_update)
PLOT_HELP = "Hover a point for its setting. Drag across points (left to right) to adopt that setting's slider values."
TABLE_HEADERS = ["", "setting", "identity (mean ± std)", "face found", "prompt score (mean ± std)"]


# ----------------------------------------------------------------------------- inputs
def band_choice(band: tuple[int, int]) -> tuple[str, str]:
    """CheckboxGroup choice (shown, value) of an interval, e.g. ("t 200–800", "200,800")."""
    return f"t {band[0]}–{band[1]}", f"{band[0]},{band[1]}"


def parse_bands(values: Sequence[str]) -> list[tuple[int, int]]:
    """Sorted intervals from CheckboxGroup values "lo,hi" (which come in the order they were ticked)."""
    if not values:
        raise FormError("Choose at least one identity interval to try.")
    bands = set()
    for value in values:
        lo, hi = (int(part) for part in str(value).split(","))
        bands.add(check_band((lo, hi), "interval"))
    return sorted(bands)


def parse_balances(values: Sequence[float | str]) -> list[float]:
    """Sorted balances γ from CheckboxGroup values."""
    if not values:
        raise FormError("Choose at least one tandem balance γ to try.")
    return sorted({float(value) for value in values})


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-blank line, each with {} for the person; raises ValueError naming a bad line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise FormError("Write at least one prompt, one per line, with {} where the person goes.")
    if len(lines) > MAX_PROMPTS:
        raise FormError(f"A sweep takes at most {MAX_PROMPTS} prompts; you wrote {len(lines)}.")
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            prompts.append(check_prompt(line))
        except PromptError as exc:
            raise FormError(f"Prompt {number}: {exc}") from None
    return prompts


def parse_seeds(text: str) -> list[int]:
    """Whole numbers separated by spaces or commas, e.g. "0 1"."""
    parts = (text or "").replace(",", " ").split()
    if not parts:
        raise FormError("Give at least one seed, e.g. 0 1.")
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        raise FormError(f"Seeds must be whole numbers separated by spaces, got {text!r}.") from None
    if len(seeds) > MAX_SEEDS:
        raise FormError(f"A sweep takes at most {MAX_SEEDS} seeds; you gave {len(seeds)}.")
    return list(dict.fromkeys(seeds))


def default_prompts() -> str:
    """Two prompts from the shipped evaluation file: a scene and a style."""
    try:
        prompts = read_prompt_file(EVAL_PROMPTS_FILE)
    except PromptError:
        return "a photo of {} on the beach\nan oil painting of {}"
    style = next((p for p in prompts if "painting" in p), prompts[-1])
    return "\n".join(dict.fromkeys([prompts[0], style]))


# ----------------------------------------------------------------------------- settings
# joins the keys of settings drawn as one dot (a key itself is "start,end,gamma")
KEY_SEPARATOR = ";"


def setting_key(band: tuple[int, int], balance: float) -> str:
    """A setting as a Dropdown / plot value, e.g. "400,800,1.5"."""
    return f"{band[0]},{band[1]},{balance:g}"


def parse_setting_key(key: str) -> tuple[tuple[int, int], float]:
    lo, hi, balance = str(key).split(",")
    return (int(lo), int(hi)), float(balance)


def sweep_files(sweep: SweepSnapshot, session_folder: Path) -> list[tuple[str, str]]:
    """(image file, caption) per image of ``sweep`` so far, each written once (in a folder named
    by the sweep's uid inside the session's folder, so it goes with the session), so that each
    frame sends paths instead of re-encoding every image."""
    folder = _folder(sweep, session_folder)
    items = []
    for index, point in enumerate(sweep.points):
        for n, (image, text) in enumerate(gallery_items([point], sweep.prompts, sweep.seeds)):
            path = folder / f"setting{index:03d}-{n:03d}.png"
            if not path.exists():
                image.save(path)
            items.append((str(path), text))
    return items


def sweep_grid_path(sweep: SweepSnapshot, session_folder: Path) -> str:
    """The labelled grid PNG of a finished sweep, written once."""
    path = _folder(sweep, session_folder) / "sweep-grid.png"
    if not path.exists():
        grid_image(list(sweep.points), list(sweep.prompts), list(sweep.seeds)).save(path)
    return str(path)


def _folder(sweep: SweepSnapshot, session_folder: Path) -> Path:
    folder = Path(session_folder) / f"sweep-{sweep.uid}"
    folder.mkdir(exist_ok=True)  # inside the session's folder, which the registry made
    return folder


# ----------------------------------------------------------------------------- views
def _identity_series(point: SweepPoint) -> str | None:
    """The unscored outcome of a point, or None when it has an identity score."""
    if point.face_rate == 0:
        return NO_FACE
    if point.mean_identity is None:
        return NO_REFERENCE
    return None


def best_of(points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The best-balance point (``pick_balanced``), None for no points. A frame computes it once
    and hands it to each view below; called alone, each view computes it itself."""
    return pick_balanced(points) if points else None


def scatter_frame(points: Sequence[SweepPoint], best: SweepPoint | None = None) -> pd.DataFrame:
    """Rows for the plot: prompt score (x), identity (y), series (colour), setting, faces, key.

    Settings without an identity score (no face found / no reference photo) are drawn at
    identity 0 in their own series: an outcome, not a score of 0. The best balance among the
    scored settings is its own series, last so that it is drawn on top; when no setting has an
    identity score the best is marked in the table and summary only. The frame starts with
    one row per series with NaN coordinates (not drawn; see ``SERIES_COLORS``).
    """
    best = best or best_of(points)
    rows = [
        {"prompt": math.nan, "identity": math.nan, "series": series, "setting": "", "faces": "", "key": ""}
        for series in SERIES_COLORS
    ]
    drawn = []
    for point in points:
        unscored = _identity_series(point)
        faces = sum(s.identity.face_found for s in point.scores)
        drawn.append(
            {
                "prompt": round(point.mean_prompt, 2),
                "identity": 0.0 if unscored else round(point.mean_identity, 3),
                "series": unscored or (BEST if point is best else SCORED),
                "setting": point.label,
                "faces": f"{faces} of {len(point.scores)} images",
                "key": setting_key(point.band, point.balance),
            }
        )
    drawn = _merge_overlaps(drawn)
    drawn.sort(key=lambda row: row["series"] == BEST)
    frame = pd.DataFrame(rows + drawn)
    return frame.astype({"prompt": float, "identity": float})


def plot_update(points: Sequence[SweepPoint], best: SweepPoint | None = None) -> gr.ScatterPlot:
    """The scatter for ``points``, one pixel taller while it has points.

    Gradio 6.31 lays its Vega-Lite view out when it builds it and afterwards only swaps the
    data, unless the plot's box changes size. A plot without points has no x tick labels; when
    points arrive the axis grows and pushes the legend (below the plot) out of the box. The
    pixel makes the box change size exactly when the tick labels come or go, so the view is
    laid out again with them and the legend stays whole.
    """
    return gr.ScatterPlot(value=scatter_frame(points, best), height=PLOT_HEIGHT + (1 if points else 0))


def _merge_overlaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points drawn at the same place become one, whose tooltip names every setting there (the
    best balance's series wins), so that none hides another unseen."""
    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for row in rows:
        place = (row["prompt"], row["identity"])
        if place not in merged:
            merged[place] = dict(row)
            continue
        kept = merged[place]
        kept["setting"] = f"{kept['setting']} = {row['setting']}"
        kept["key"] = f"{kept['key']}{KEY_SEPARATOR}{row['key']}"  # a drag over the dot weighs every setting in it
        if row["series"] == BEST:
            kept["series"] = BEST
    return list(merged.values())


def ties_of(points: Sequence[SweepPoint], best: SweepPoint) -> list[SweepPoint]:
    """Other settings whose scores equal the best balance's as shown (then the pick is a tie)."""
    def shown(point: SweepPoint) -> tuple[float, float]:
        return round((point.mean_identity or 0.0) * point.face_rate, 2), round(point.mean_prompt, 1)

    return [point for point in points if point is not best and shown(point) == shown(best)]


def _mean_std(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(points: Sequence[SweepPoint], best: SweepPoint | None = None) -> pd.DataFrame:
    """One row per setting: best-balance mark, setting, identity, face rate, prompt score."""
    best = best or best_of(points)
    rows = []
    for point in points:
        unscored = _identity_series(point)
        identity = unscored if unscored else _mean_std(point.mean_identity, point.identity_std or 0.0, 2)
        faces = sum(s.identity.face_found for s in point.scores)
        rows.append(
            [
                "★" if point is best else "",
                point.label,
                identity,
                f"{point.face_rate:.0%} ({faces}/{len(point.scores)})",
                _mean_std(point.mean_prompt, point.prompt_std, 1),
            ]
        )
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def gallery_items(points: Sequence[SweepPoint], prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[Any, str]]:
    """(image, caption) per image, setting by setting: setting · scores · seed · prompt."""
    columns = [(prompt, seed) for prompt in prompts for seed in seeds]
    items = []
    for point in points:
        for image, scores, (prompt, seed) in zip(point.images, point.scores, columns):
            items.append((image, f"{point.label} · {caption(scores)} · seed {seed} · {prompt}"))
    return items


def gallery_columns(images_per_setting: int) -> int:
    """Columns so that each row holds whole settings: 4 for 1-2 images per setting, else one setting (≤ 8)."""
    return 4 if images_per_setting <= 2 else min(images_per_setting, 8)


def summary_markdown(run: SweepSnapshot, best: SweepPoint | None = None) -> str:
    """Best balance, what produced the scores, and why some points have no identity score."""
    points = run.points
    if not points:
        return ""
    best = best or best_of(points)
    unscored = _identity_series(best)
    identity = unscored or f"identity {best.mean_identity:.2f}"
    rule = (
        "the setting whose weaker score, each scaled over this sweep, is highest"
        if any(p.mean_identity is not None for p in points)
        else "without identity scores the prompt score alone decides"
    )
    lines = [f"**{BEST}: {best.label}** — {identity}, prompt score {best.mean_prompt:.1f} ({rule})."]
    ties = ties_of(points, best)
    if ties:
        others = ", ".join(point.label for point in ties)
        lines[0] = (f"**Tie** for the best balance: {best.label} and {others} score the same "
                    f"({identity}, prompt score {best.mean_prompt:.1f}); {best.label} is marked ★.")
    first = points[0].scores[0]
    photos = _count(run.references, "photo") if run.references else "no photo"
    lines.append(f"Scores: identity by **{first.identity.model}** against {photos} · prompt by **{first.prompt.model}**.")
    no_face = sum(p.face_rate == 0 for p in points)
    not_scored = sum(_identity_series(p) == NO_REFERENCE for p in points)
    if no_face or not_scored:
        note = (
            "Identity can only be scored with a real backbone and a reference photo. "
            f"Grey points have no identity score and are drawn at 0 — that is not a score of 0: "
        )
        reasons = []
        if no_face:
            reasons.append(f"{no_face} of {len(points)} settings produced no detectable face")
        if not_scored:
            reasons.append(f"{not_scored} had faces but there is no reference photo to compare with")
        note += "; ".join(reasons) + "."
        if run.random_backbone:
            note += " (The tiny demo model draws noise, so it never makes a face.)"
        lines.append(f"⚠️ {note}")
    return "\n\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def progress_markdown(run: SweepSnapshot) -> str:
    """"Running: setting 2 of 4 …" while running; done / stopped / failed afterwards."""
    done, total = len(run.points), run.total
    shape = f"{_count(run.images_per_setting, 'image')} each, {_count(run.steps, 'step')}"
    if run.error:
        return f"✗ {run.error}"
    if not run.finished:
        band, balance = run.settings[min(done, total - 1)]
        return f"Running: **setting {done + 1} of {total}** … ({setting_label(band, balance)}; {shape})"
    seconds = (run.finished_at or time.monotonic()) - run.started
    if run.stopped or done < total:
        return f"■ **Stopped** after {done} of {total} settings ({seconds:.0f} s); the finished ones are shown."
    return f"✓ **Done**: {_count(total, 'setting')}, {shape}, in {seconds:.0f} s."


def setting_choices(points: Sequence[SweepPoint], best: SweepPoint | None = None) -> list[tuple[str, str]]:
    """Dropdown choices (label, key), the best balance marked."""
    best = best or best_of(points)
    return [(f"{p.label}  {BEST}" if p is best else p.label, setting_key(p.band, p.balance)) for p in points]


def is_range(x_range: Any) -> bool:
    """A drag's [lo, hi]; the page also sends a select with [None, None] when a drag is cleared."""
    return isinstance(x_range, (list, tuple)) and len(x_range) == 2 and all(
        isinstance(x, (int, float)) and math.isfinite(x) for x in x_range
    )


def keys_in_range(frame: pd.DataFrame, x_range: Sequence[float]) -> list[str]:
    """Keys of the settings whose prompt score lies in a drag over [lo, hi], nearest its centre first."""
    if frame.empty or not is_range(x_range):
        return []
    lo, hi = sorted(float(x) for x in x_range)
    inside = frame[(frame["prompt"] >= lo) & (frame["prompt"] <= hi)]
    distance = (inside["prompt"] - (lo + hi) / 2).abs()
    ordered = inside.assign(distance=distance).sort_values("distance", kind="stable")["key"]
    return [key for keys in ordered for key in str(keys).split(KEY_SEPARATOR)]


def choose_setting(keys: Sequence[str], points: Sequence[SweepPoint]) -> str | None:
    """Of several settings a drag selected (the brush spans the x axis only), the best balance
    among them; without their points, the one nearest the brush's centre."""
    candidates = [p for p in points if setting_key(p.band, p.balance) in keys]
    if candidates:
        best = pick_balanced(candidates)
        return setting_key(best.band, best.balance)
    return keys[0] if keys else None


def plot_value_frame(value: Any) -> pd.DataFrame:
    """The ScatterPlot's payload (PlotData / dict with columns + data) back as a DataFrame."""
    if value is None:
        return scatter_frame([])
    columns = value["columns"] if isinstance(value, dict) else value.columns
    data = value["data"] if isinstance(value, dict) else value.data
    frame = pd.DataFrame(data, columns=columns)
    # the blank rows come back as null coordinates
    frame["prompt"] = pd.to_numeric(frame["prompt"], errors="coerce")
    return frame


# ----------------------------------------------------------------------------- the tab
def _explore_layout(default_steps: int) -> SimpleNamespace:
    """Every component of the tab, by name."""
    tab = SimpleNamespace()
    gr.Markdown(EXPLAIN, elem_id="explore-help")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=340):
            tab.bands = gr.CheckboxGroup(
                [band_choice(b) for b in BAND_CHOICES], value=[band_choice(b)[1] for b in BANDS_PRESELECTED],
                label="Identity intervals to try", elem_id="explore-bands",
            )
            tab.balances = gr.CheckboxGroup(
                [(f"γ {g:g}", g) for g in BALANCE_CHOICES], value=BALANCES_PRESELECTED,
                label="Tandem balances γ to try", elem_id="explore-balances",
            )
            tab.prompts = gr.Textbox(
                default_prompts(), lines=3, max_lines=MAX_PROMPTS, label="Prompts, one per line ({} = the person)",
                elem_id="explore-prompts",
            )
            with gr.Row():
                tab.seeds = gr.Textbox("0 1", label="Seeds", elem_id="explore-seeds", min_width=100)
                tab.steps = gr.Slider(1, 100, value=default_steps, step=1, label="Denoising steps", elem_id="explore-steps")
            with gr.Row():
                tab.run_btn = gr.Button("Run sweep", variant="primary", elem_id="explore-run")
                tab.stop_btn = gr.Button("Stop", variant="stop", elem_id="explore-stop")
            tab.progress = gr.Markdown(elem_id="explore-progress")
        with gr.Column(scale=3, min_width=420):
            tab.plot = gr.ScatterPlot(
                scatter_frame([]), x="prompt", y="identity", color="series", tooltip=["setting", "faces"],
                title="Identity vs prompt fidelity, one point per setting",
                x_title="prompt score (0–100)", y_title="identity similarity (0–1)", color_title="outcome",
                color_map=SERIES_COLORS, y_lim=[-0.05, 1.05], x_axis_format=".1f", height=PLOT_HEIGHT, elem_id="explore-plot",
            )
            gr.Markdown(PLOT_HELP, elem_classes=["help"])
            tab.summary = gr.Markdown(elem_id="explore-summary")
            with gr.Row(equal_height=True):
                tab.pick = gr.Dropdown([], label="Setting to adopt", elem_id="explore-pick", scale=3, interactive=True)
                tab.adopt_btn = gr.Button("Use these slider values", elem_id="explore-adopt", scale=1)
            tab.adopted = gr.Markdown(elem_id="explore-adopted")
    tab.table = gr.Dataframe(
        headers=TABLE_HEADERS, label="Results per setting", interactive=False, elem_id="explore-table", wrap=True,
    )
    tab.gallery = gr.Gallery(
        label="Images (setting · scores · seed · prompt)", columns=4, fit_columns=False, object_fit="contain",
        interactive=False, elem_id="explore-gallery",
    )
    tab.grid_file = gr.File(label="Labelled grid (PNG)", interactive=False, elem_id="explore-grid-file")
    tab.outputs = [tab.progress, tab.plot, tab.summary, tab.table, tab.gallery, tab.pick, tab.grid_file, tab.adopted]
    return tab


def sweep_frame(run: SweepSnapshot, folder: Path, *, final: bool, first: bool = False) -> list[Any]:
    """Every output of the tab for the sweep's current points (the engine's snapshot), in
    ``tab.outputs`` order; the grid file only once it has ended; the last adoption's note is
    cleared when a sweep starts. Image files go to ``folder`` (the session's)."""
    points = list(run.points)
    best = best_of(points)
    return [
        progress_markdown(run),
        plot_update(points, best),
        summary_markdown(run, best),
        results_table(points, best),
        gr.Gallery(value=sweep_files(run, folder), columns=gallery_columns(run.images_per_setting)),
        gr.Dropdown(choices=setting_choices(points, best), value=best and setting_key(best.band, best.balance)),
        sweep_grid_path(run, folder) if final and points else gr.skip(),
        "" if first else gr.skip(),
    ]


def adopt_setting(key: str | None) -> list[Any]:
    """The three slider values of a setting key, a note saying so, and the key adopted (band
    start, end, γ, note, key; the key is None when nothing was adopted)."""
    if not key:
        gr.Warning("Run a sweep first, then choose one of its settings.")
        return [gr.skip()] * 4 + [None]
    (lo, hi), gamma = parse_setting_key(key)
    note = f"✓ Sliders set to **{setting_label((lo, hi), gamma)}**; the previews re-render at them, and *Generate* uses them."
    return [lo, hi, gamma, note, key]


class ExploreHandlers:
    """The tab's handlers, for one server: ``engine_for`` and ``folder_for`` give a request's
    engine and session folder (deleted with the session); ``render_previews(lo, hi, γ, request)``
    renders the studio's previews at slider values set here (the page's previews, or a skip)."""

    def __init__(self, engine_for: Callable[[gr.Request], Engine], folder_for: Callable[[gr.Request], Path],
                 render_previews: Callable[[Any, Any, Any, gr.Request], Any]) -> None:
        self.engine_for, self.folder_for, self.render_previews = engine_for, folder_for, render_previews
        self.on_run = spaces.GPU(duration=GPU_DURATION_S)(self._run)  # ZeroGPU: a GPU-attached process

    def _run(self, band_values, balance_values, prompt_text, seed_text, n_steps, request: gr.Request):
        engine, folder = self.engine_for(request), self.folder_for(request)
        try:
            points = engine.sweep(
                parse_prompts(prompt_text), parse_seeds(seed_text), parse_bands(band_values),
                parse_balances(balance_values), steps=int(n_steps),
            )
        except (ValueError, RuntimeError) as exc:  # a StudioError is said; anything else: one generic sentence
            raise views.user_error(exc) from None
        yield sweep_frame(engine.snapshot().sweep, folder, final=False, first=True)
        try:
            for _ in points:
                sweep = engine.snapshot().sweep
                if len(sweep.points) < sweep.total:
                    yield sweep_frame(sweep, folder, final=False)
        except Exception:  # the engine has logged it and put its sentence in the sweep's snapshot
            gr.Warning(engine.snapshot().sweep.error)
        finally:
            points.close()  # runs on normal end, on error, and when the page goes (Gradio closes the stream)
        yield sweep_frame(engine.snapshot().sweep, folder, final=True)

    def on_stop_click(self, request: gr.Request) -> None:
        """The tab's Stop: cancel the sweep. Its stream is the one writer of the tab: it sees the
        end and sends it as its last frame (as the training stream does: docs/ARCHITECTURE.md)."""
        self.engine_for(request).cancel_sweep()  # the sweep was armed when it was called, so one cancel suffices

    def on_stop(self, request: gr.Request) -> str:
        """The ``/explore_stop`` endpoint: cancel, wait for the end, return the progress line
        ("" when no sweep ran)."""
        engine = self.engine_for(request)
        if engine.snapshot().sweep is None:
            return ""
        engine.cancel_sweep()
        try:
            engine.wait_until(lambda snap: snap.sweep is None or snap.sweep.finished, timeout=views.STOP_TIMEOUT_S)
        except TimeoutError:
            pass  # a hung sweep: say where it is
        return progress_markdown(engine.snapshot().sweep)

    def on_select(self, plot_value, evt: gr.SelectData, request: gr.Request) -> list[Any]:
        """A drag across the plot adopts the best setting under it (pick, band start, end, γ, note, key)."""
        x_range = evt.value if isinstance(evt.value, list) else []
        keys = keys_in_range(plot_value_frame(plot_value), x_range)
        sweep = self.engine_for(request).snapshot().sweep
        key = choose_setting(keys, list(sweep.points) if sweep is not None else [])
        if key is None:
            if is_range(x_range):  # a drag over empty space, not a cleared one
                gr.Info("No setting lies in that range: drag across a point.")
            return [gr.skip()] * 5 + [None]
        lo, hi, gamma, note, _key = adopt_setting(key)
        if len(keys) > 1:
            note += f" ({len(keys)} settings lie in the range you dragged: this is the best balance among them.)"
        return [key, lo, hi, gamma, note, key]

    def on_adopted(self, lo: Any, hi: Any, gamma: Any, key: str | None, request: gr.Request) -> Any:
        """After an adoption: the previews at the adopted values, as after any other change of the
        sliders that is not the user's own (nothing when nothing was adopted)."""
        return gr.skip() if key is None else self.render_previews(lo, hi, gamma, request)


def build_explore_tab(engine_for: Callable[[gr.Request], Engine], folder_for: Callable[[gr.Request], Path],
                      band_lo: gr.Slider, band_hi: gr.Slider, balance: gr.Slider, previews: gr.Gallery,
                      render_previews: Callable[[Any, Any, Any, gr.Request], Any], *, default_steps: int = 20) -> None:
    """The Explore panel; call inside ``with gr.Tab("Explore")``. Adopting a setting sets the three
    sliders, then re-renders ``previews`` with ``render_previews`` (see ExploreHandlers)."""
    tab = _explore_layout(default_steps)
    on = ExploreHandlers(engine_for, folder_for, render_previews)
    sliders = [band_lo, band_hi, balance]
    tab.run_btn.click(
        on.on_run, [tab.bands, tab.balances, tab.prompts, tab.seeds, tab.steps], tab.outputs, api_name="explore_sweep",
        concurrency_limit=None,
    )
    tab.stop_btn.click(on.on_stop_click, None, None, api_visibility="private", concurrency_limit=None)
    gr.api(on.on_stop, api_name="explore_stop", concurrency_limit=None)
    adopted_key = gr.State(None)  # the setting an adoption set, None when it set nothing
    rerender = dict(fn=on.on_adopted, inputs=[*sliders, adopted_key], outputs=previews, show_progress="hidden",
                    api_visibility="private", concurrency_limit=None)
    tab.adopt_btn.click(adopt_setting, [tab.pick], [*sliders, tab.adopted, adopted_key], api_name="explore_adopt",
                        concurrency_limit=None).then(**rerender)
    tab.plot.select(on.on_select, [tab.plot], [tab.pick, *sliders, tab.adopted, adopted_key], api_visibility="private",
                    concurrency_limit=None).then(**rerender)
