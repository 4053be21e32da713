"""The learned concept: mapper weights + what is needed to use them, immutable once made.

A :class:`Concept` is a snapshot: the trainer hands out a new one (with a new ``uid``) whenever
weights change, so samplers may cache text conditions by ``uid``. Writing and reading concept
files (and training checkpoints) is studio/concept_file.py's.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.mapper import Mapper


@dataclass(frozen=True, eq=False)
class Concept:
    """A learned identity.

    mapper: the trained IdentityMapper or StaticTokenMapper (eval mode, never modified after the snapshot).
    image_embedding: (E,) CLIP image embedding of the reference photo(s) for the bypass, or None.
    stage_regulation: False = the identity at every denoising step, whatever the generation band.
    """

    mapper: Mapper
    super_category: str
    train_band: tuple[int, int]
    late_stage: str
    backbone: dict[str, Any]  # Backbone.fingerprint() of the backbone it was trained on
    image_embedding: torch.Tensor | None = None
    steps_done: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the StudioConfig.to_dict() used for training
    stage_regulation: bool = True
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_tokens(self) -> int:
        return self.mapper.num_tokens

    @property
    def method(self) -> str:
        """"personamagic" or "ti" (the plain textual-inversion baseline)."""
        return self.mapper.method

    @property
    def tokens(self) -> list[str]:
        """Display names of the identity tokens: <id1> ... <idK>."""
        return [f"<id{i + 1}>" for i in range(self.num_tokens)]


def describe(concept: Concept) -> str:
    """One line for people: tokens, super-category, training, band, source model."""
    bypass = "with" if concept.mapper.has_bypass and concept.image_embedding is not None else "without"
    lo, hi = concept.train_band
    source = concept.backbone.get("source", "?")
    if concept.method == "ti":
        return (
            f"{' '.join(concept.tokens)} ({concept.super_category}), textual-inversion baseline, {concept.steps_done} "
            f"training steps on {source}, one static token, identity at every step"
        )
    return (
        f"{' '.join(concept.tokens)} ({concept.super_category}), {concept.steps_done} training steps on {source}, "
        f"{f'band {lo}-{hi}' if concept.stage_regulation else 'no stage regulation (identity at every step)'}, "
        f"{bypass} image bypass, {sum(p.numel() for p in concept.mapper.parameters()) / 1e6:.2f} M parameters"
    )
