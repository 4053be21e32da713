"""Typed, immutable events the trainer and engine emit; the UI only renders these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL.Image import Image

    from studio.concept import Concept
    from studio.metrics import ImageScores


@dataclass(frozen=True)
class TrainingStep:
    """One optimiser step finished (``step`` counts from 1)."""

    step: int
    total: int
    loss: float  # rec_loss + te_weight * te_loss + cgdr_weight * cgdr_loss
    rec_loss: float
    te_loss: float
    lr: float
    seconds: float  # wall time of this step
    attention_balance: float | None = None  # ā of the TE term: identity's share vs the top other token
    cgdr_loss: float = 0.0  # class-guided denoising regularization outside the face (0 when off)


@dataclass(frozen=True)
class PreviewReady:
    """Preview images of the concept after ``step`` optimiser steps (0 = before training)."""

    step: int
    images: tuple[Image, ...]
    captions: tuple[str, ...]
    band: tuple[int, int]
    balance: float
    scores: tuple[ImageScores, ...] = field(default_factory=tuple)  # per image, when scoring is on


@dataclass(frozen=True)
class ConceptUpdated:
    """New weights are available as an immutable concept (e.g. at the end of a ZeroGPU chunk)."""

    step: int
    concept: Concept


@dataclass(frozen=True)
class RolledBack:
    """A non-finite loss or gradient: the mapper and optimiser went back to ``restored_step``."""

    step: int
    restored_step: int
    reason: str


@dataclass(frozen=True)
class TrainingFinished:
    """Training reached its last step (or was stopped): ``concept`` is the result."""

    step: int
    total: int
    concept: Concept
    stopped: bool = False


@dataclass(frozen=True)
class TrainingFailed:
    """Training cannot go on; ``message`` is for the user, ``kind`` is 'oom' or 'error'."""

    step: int
    message: str
    kind: str = "error"


TrainingEvent = Union[TrainingStep, PreviewReady, ConceptUpdated, RolledBack, TrainingFinished, TrainingFailed]
