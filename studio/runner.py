"""Where training steps run: the one place that knows about ZeroGPU.

Locally (and on ordinary GPU Spaces) the engine drives a ``studio.training.TrainingRun`` on a
background thread. On a ZeroGPU Space no background thread can hold the GPU: GPU work happens only inside
a ``@spaces.GPU`` call, which runs in a forked process (arguments and results are pickled).
There the same trainer runs in *chunks*: each call rebuilds it from plain data (config dict,
photos, the previous chunk's CPU state dict), trains up to N steps yielding the usual events,
and finally yields its state for the next chunk. The chunk side is here; the driving side
(``chunked_events``) is studio/training.py's, re-exported.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from studio.events import ConceptUpdated, TrainingEvent, TrainingFailed
from studio.training import DEFAULT_CHUNK_STEPS, ChunkState, TrainingRun, chunked_events, to_cpu

__all__ = ["CHUNK_DURATION_S", "DEFAULT_CHUNK_STEPS", "ChunkState", "chunked_events", "chunked_training",
           "to_cpu", "training_chunk", "zero_gpu"]

CHUNK_DURATION_S = int(os.environ.get("STUDIO_CHUNK_DURATION_S", "120"))


def zero_gpu() -> bool:
    """True on a ZeroGPU Space (the variable that makes ``spaces.GPU`` active)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def chunked_training() -> bool:
    """Train in request-driven chunks: on ZeroGPU, or when STUDIO_CHUNKED_TRAINING=1 asks for
    the same code path elsewhere (tests, and servers that forbid background threads)."""
    return zero_gpu() or os.environ.get("STUDIO_CHUNKED_TRAINING", "") == "1"


def training_chunk(
    cfg_dict: dict[str, Any],
    photos: Sequence[Any],
    state: dict[str, Any] | None,
    until: int,
    preview_band: tuple[int, int],
    preview_balance: float,
) -> Iterator[TrainingEvent | ChunkState]:
    """Train from ``state`` up to step ``until``; yields events, then a ChunkState.

    Pure function of plain, picklable inputs (TrainingPhoto holds a PIL image and a numpy mask),
    so it can run in the forked process of a ``spaces.GPU`` call.
    """
    from studio.backbone import get_backbone
    from studio.config import config_from_dict
    from studio.sampler import shared_sampler

    cfg = config_from_dict(cfg_dict)
    backbone = get_backbone(cfg.model)
    run = TrainingRun(backbone, cfg, photos, state=state, sampler=shared_sampler(backbone),
                      preview=(preview_band, preview_balance))
    trainer = run.build()
    for event in run.events(until=until):
        yield event
        if isinstance(event, TrainingFailed):
            return
    if not trainer.done:
        yield ConceptUpdated(trainer.step, trainer.concept())
    yield ChunkState(run.end_state())
