"""The learned concept: mapper weights + what is needed to use them, immutable once made.

A :class:`Concept` is a snapshot: the trainer hands out a new one (with a new ``uid``) whenever
weights change, so samplers may cache text conditions by ``uid``.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.mapper import IdentityMapper


@dataclass(frozen=True, eq=False)
class Concept:
    """A learned identity.

    mapper: the trained IdentityMapper (eval mode, never modified after the snapshot).
    image_embedding: (E,) CLIP image embedding of the reference photo(s) for the bypass, or None.
    """

    mapper: IdentityMapper
    super_category: str
    train_band: tuple[int, int]
    late_stage: str
    backbone: dict[str, Any]  # Backbone.fingerprint() of the backbone it was trained on
    image_embedding: torch.Tensor | None = None
    steps_done: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the StudioConfig.to_dict() used for training
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_tokens(self) -> int:
        return self.mapper.num_tokens

    @property
    def tokens(self) -> list[str]:
        """Display names of the identity tokens: <id1> ... <idK>."""
        return [f"<id{i + 1}>" for i in range(self.num_tokens)]
