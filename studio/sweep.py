"""Parameter sweeps over the generation band and the tandem balance, scored (docs/ALGORITHM.md, "Evaluation").

Used by the studio's Explore panel and by ``python -m studio eval``: each setting
(band, balance) generates the same prompts and seeds, and is scored for identity and
prompt fidelity. Settings stream out one at a time so a caller can show progress and stop
between them.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from studio.concept import Concept
from studio.conditioning import PromptError, check_prompt
from studio.config import EVAL_PROMPTS_FILE, check_band
from studio.events import PreviewReady
from studio.faces import PhotoSource
from studio.metrics import ImageScores, Scorer, caption
from studio.sampler import GenerationInterrupted, GenerationSettings, Sampler



def setting_label(band: tuple[int, int], balance: float) -> str:
    """Short name of a sweep setting, e.g. ``t 400–800 · γ 1.00`` (also for settings not yet run)."""
    return f"t {band[0]}–{band[1]} · γ {balance:.2f}"


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep and what it produced.

    images: one per (prompt, seed), prompt-major, like ``Sampler``'s output; scores likewise.
    mean_identity: mean similarity over images where a face was found (None: no face or no references).
    face_rate: share of images with a detected face. mean_prompt: mean CLIPScore.
    """

    band: tuple[int, int]
    balance: float
    images: tuple[Image.Image, ...]
    scores: tuple[ImageScores, ...]
    mean_identity: float | None
    face_rate: float
    mean_prompt: float

    @property
    def label(self) -> str:
        """Short name of the setting, e.g. ``t 400–800 · γ 1.00``."""
        return setting_label(self.band, self.balance)

    @property
    def identity_std(self) -> float | None:
        """Spread (population std) of identity over images with a face; None without any."""
        values = _identities(self.scores)
        return float(np.std(values)) if values else None

    @property
    def prompt_std(self) -> float:
        return float(np.std([s.prompt.score for s in self.scores]))


def _identities(scores: Sequence[ImageScores]) -> list[float]:
    return [s.identity.similarity for s in scores if s.identity.similarity is not None]


def summarise(band: tuple[int, int], balance: float, images: Sequence[Image.Image], scores: Sequence[ImageScores]) -> SweepPoint:
    """A :class:`SweepPoint` with the means of ``scores``."""
    identities = _identities(scores)
    return SweepPoint(
        band=band,
        balance=balance,
        images=tuple(images),
        scores=tuple(scores),
        mean_identity=float(np.mean(identities)) if identities else None,
        face_rate=sum(s.identity.face_found for s in scores) / len(scores) if scores else 0.0,
        mean_prompt=float(np.mean([s.prompt.score for s in scores])) if scores else 0.0,
    )


def sweep(
    sampler: Sampler,
    concept: Concept,
    prompts: Sequence[str],
    seeds: Sequence[int],
    bands: Sequence[tuple[int, int]],
    balances: Sequence[float],
    scorer: Scorer,
    references: Sequence[PhotoSource | np.ndarray] = (),
    *,
    settings: GenerationSettings,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[SweepPoint]:
    """Generate and score every (band, balance) setting, band-major; yield each as it completes.

    sampler: a ``studio.sampler.Sampler`` (or a callable with its signature, e.g. one that
    holds the accelerator gate); every setting uses the same prompts and seeds.
    references: reference photos or identity embeddings (embedded once, up front).
    settings: steps, guidance, scheduler, size ... of every setting (its band, balance and seeds
        are replaced by the grid's; e.g. ``GenerationSettings.from_config(cfg)``).
    should_stop: checked before each setting and after each denoising step; when it returns
    True the sweep ends: points already yielded stand, a setting under way is dropped.
    """
    grid = [(check_band(band), float(balance)) for band in bands for balance in balances]
    if not grid or not prompts or not seeds:
        raise ValueError("a sweep needs at least one band, one balance, one prompt and one seed")
    reference_embeddings = scorer.embed_references(references)
    # The sampler returns images prompt-major: all seeds of the first prompt, then the next.
    image_prompts = [prompt for prompt in prompts for _ in seeds]
    stop_requested = should_stop or (lambda: False)
    for band, balance in grid:
        if stop_requested():
            return
        try:
            this = replace(settings, band=band, balance=balance, seeds=list(seeds))
            result = sampler(
                concept, list(prompts), callback_on_step_end=lambda step, total: stop_requested(), **this.kwargs()
            )
        except GenerationInterrupted:
            return
        images = list(result.images)
        scores = scorer.score(images, image_prompts, reference_embeddings, super_category=concept.super_category)
        yield summarise(band, balance, images, scores)


@dataclass(frozen=True)
class SweepSnapshot:
    """One sweep of a session as the engine last published it (``Snapshot.sweep``). Immutable.

    What was asked (bands, balances, prompts, seeds, steps; ``references``: the identity photos
    the images are scored against), the points finished so far (band-major), and how it ended:
    ``state`` is "running", "done", "stopped" or "failed" (``error`` then says why).
    """

    bands: tuple[tuple[int, int], ...]
    balances: tuple[float, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    references: int
    random_backbone: bool = False
    points: tuple[SweepPoint, ...] = ()
    state: str = "running"
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def stopped(self) -> bool:
        return self.state == "stopped"

    @property
    def settings(self) -> list[tuple[tuple[int, int], float]]:
        """Band-major, the order :func:`sweep` runs them in."""
        return [(band, balance) for band in self.bands for balance in self.balances]

    @property
    def total(self) -> int:
        return len(self.bands) * len(self.balances)

    @property
    def images_per_setting(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def with_point(self, point: SweepPoint) -> SweepSnapshot:
        return replace(self, points=self.points + (point,))

    def ended(self, state: str, error: str = "") -> SweepSnapshot:
        """This sweep finished as ``state`` ("done", "stopped" or "failed")."""
        return replace(self, state=state, error=error, finished_at=time.monotonic())


@dataclass(frozen=True)
class BestStep:
    """Scored training previews and the step among them with the best identity/prompt balance
    (:func:`pick_balanced`). Immutable: :meth:`with_preview` returns the next one."""

    points: tuple[tuple[int, SweepPoint], ...] = ()

    def with_preview(self, preview: PreviewReady) -> BestStep:
        """This plus a scored preview (a newer preview of the same step replaces the older)."""
        point = summarise(preview.band, preview.balance, preview.images, preview.scores)
        return BestStep(tuple((s, p) for s, p in self.points if s != preview.step) + ((preview.step, point),))

    @property
    def step(self) -> int | None:
        """The best-balanced trained step. Step 0 (the untrained start, the class word alone)
        is never the pick once a trained step is scored: going back to it is never what
        *Best step* is for, though on a backbone that finds no faces it can score best."""
        trained = [(s, p) for s, p in self.points if s > 0] or list(self.points)
        if not trained:
            return None
        best = pick_balanced([p for _, p in trained])
        return next(s for s, p in trained if p is best)

    @property
    def note(self) -> str:
        """E.g. "Best balance so far: step 40 (identity 0.61, prompt 27.3)"; "" before any scored preview."""
        step = self.step
        if step is None:
            return ""
        best = dict(self.points)[step]
        identity = "no face found" if best.mean_identity is None else f"identity {best.mean_identity:.2f}"
        return f"Best balance so far: step {step} ({identity}, prompt {best.mean_prompt:.1f})"


def pick_balanced(points: Sequence[SweepPoint]) -> SweepPoint:
    """The setting with the best balance of identity and prompt fidelity.

    Rule: over the given points, identity (``mean_identity × face_rate``, so images without a
    face count as 0 and a setting that loses the face ranks low) and ``mean_prompt`` are each
    min-max normalised to [0, 1] (an axis on which all points are equal is 1 everywhere, so it
    decides nothing). The pick maximises the *weaker* of the two normalised scores (maximin);
    ties go to the higher sum, then to the earlier point. When no point has an identity score
    (no references), prompt fidelity alone decides.
    """
    if not points:
        raise ValueError("pick_balanced needs at least one sweep point")
    has_identity = any(p.mean_identity is not None for p in points)
    identity = [(p.mean_identity or 0.0) * p.face_rate for p in points]
    prompt = [p.mean_prompt for p in points]
    norm_identity = _min_max(identity) if has_identity else [1.0] * len(points)
    norm_prompt = _min_max(prompt)

    def key(i: int) -> tuple[float, float, int]:
        return (min(norm_identity[i], norm_prompt[i]), norm_identity[i] + norm_prompt[i], -i)

    return points[max(range(len(points)), key=key)]


def _min_max(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if math.isclose(lo, hi):
        return [1.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def read_prompt_file(path: str | Path = EVAL_PROMPTS_FILE) -> list[str]:
    """Prompts from a text file: one per line, each with ``{}``; blank lines and ``#`` comments skipped.

    Raises PromptError naming the line of a bad prompt, or when the file has none.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            prompts.append(check_prompt(line))
        except PromptError as exc:
            raise PromptError(f"{path.name}, line {number}: {exc}") from None
    if not prompts:
        raise PromptError(f"{path.name} has no prompts: write one per line, each with {{}} for the person.")
    return prompts


# ----------------------------------------------------------------------------- grid image
# PIL's bundled font has no glyphs for "γ" or "–": grid labels stay ASCII (plus "·").
_FONT_SIZE = 12
_PAD = 4
# Cells shrink (to 96 px at least) so that a long prompt list stays a viewable image.
_MAX_GRID_WIDTH = 8192


def grid_image(points: Sequence[SweepPoint], prompts: Sequence[str], seeds: Sequence[int]) -> Image.Image:
    """One row per setting, one column per (prompt, seed), labelled: the sweep at a glance.

    Row labels give the setting and its means; column heads the prompt and seed; each cell's
    caption its scores. Cells are the images scaled to 128-256 px (less for many columns).
    """
    if not points:
        raise ValueError("grid_image needs at least one sweep point")
    font = ImageFont.load_default(size=_FONT_SIZE)
    line = _FONT_SIZE + 3
    first = points[0].images[0]
    label_w = 150
    columns = [(prompt, seed) for prompt in prompts for seed in seeds]
    cell_w = max(128, min(256, first.width))
    cell_w = max(96, min(cell_w, (_MAX_GRID_WIDTH - label_w) // len(columns)))
    cell_h = round(cell_w * first.height / first.width)
    head_h = 2 * line + _PAD
    row_h = cell_h + line + _PAD
    grid = Image.new("RGB", (label_w + len(columns) * cell_w, head_h + len(points) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    for col, (prompt, seed) in enumerate(columns):
        x = label_w + col * cell_w + _PAD
        draw.text((x, 2), _fit(draw, prompt, font, cell_w - 2 * _PAD), fill="black", font=font)
        draw.text((x, 2 + line), f"seed {seed}", fill="dimgray", font=font)
    for row, point in enumerate(points):
        y = head_h + row * row_h
        identity = "id -" if point.mean_identity is None else f"id {point.mean_identity:.2f}"
        lines = [
            f"t {point.band[0]}-{point.band[1]}",
            f"balance {point.balance:.2f}",
            f"{identity} ({point.face_rate:.0%} face)",
            f"prompt {point.mean_prompt:.1f}",
        ]
        for i, text in enumerate(lines):
            draw.text((_PAD, y + i * line), text, fill="black", font=font)
        for col, (image, scores) in enumerate(zip(point.images, point.scores)):
            x = label_w + col * cell_w
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.LANCZOS), (x, y))
            draw.text((x + _PAD, y + cell_h + 1), _fit(draw, caption(scores), font, cell_w - 2 * _PAD), fill="black", font=font)
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` shortened with "..." to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."
