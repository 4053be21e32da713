"""Where training steps run: the one place that knows about ZeroGPU.

Locally (and on ordinary GPU Spaces) the engine pumps ``Trainer.run()`` on a background
thread. On a ZeroGPU Space no background thread can hold the GPU: GPU work happens only inside
a ``@spaces.GPU`` call, which runs in a forked process (arguments and results are pickled).
There the same trainer runs in *chunks*: each call rebuilds it from plain data (config dict,
photos, the previous chunk's CPU state dict), trains up to N steps yielding the usual events,
and finally yields its state for the next chunk.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from studio.events import ConceptUpdated, TrainingEvent, TrainingFailed, TrainingFinished

# A ZeroGPU call is billed against a daily quota: keep each one short.
DEFAULT_CHUNK_STEPS = 50
CHUNK_DURATION_S = int(os.environ.get("STUDIO_CHUNK_DURATION_S", "120"))


def zero_gpu() -> bool:
    """True on a ZeroGPU Space (the variable that makes ``spaces.GPU`` active)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def chunked_training() -> bool:
    """Train in request-driven chunks: on ZeroGPU, or when STUDIO_CHUNKED_TRAINING=1 asks for
    the same code path elsewhere (tests, and servers that forbid background threads)."""
    return zero_gpu() or os.environ.get("STUDIO_CHUNKED_TRAINING", "") == "1"


@dataclass(frozen=True)
class ChunkState:
    """End of one chunk: the trainer state (CPU tensors) to continue from."""

    state: dict[str, Any]


def to_cpu(value: Any) -> Any:
    """A copy of a (nested) trainer state with every tensor on the CPU (picklable, device-free)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


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
    from studio.engine import shared_sampler
    from studio.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    backbone = get_backbone(cfg.model)
    trainer = Trainer(backbone, cfg, photos, sampler=shared_sampler(backbone))
    if state is not None:
        trainer.load_state_dict(state)
    trainer.preview_band, trainer.preview_balance = preview_band, preview_balance
    for event in trainer.run(until=until):
        yield event
        if isinstance(event, TrainingFailed):
            return
    if not trainer.done:
        yield ConceptUpdated(trainer.step, trainer.concept())
    yield ChunkState(to_cpu(trainer.state_dict()))


def chunked_events(
    gpu_call: Callable[..., Iterator[Any]],
    cfg_dict: dict[str, Any],
    photos: Sequence[Any],
    total: int,
    preview: Callable[[], tuple[tuple[int, int], float]],
    stopped: Callable[[], bool],
    chunk_steps: int | None = None,
    state: dict[str, Any] | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[TrainingEvent]:
    """The events of a whole training, made of ``gpu_call`` chunks (``training_chunk`` wrapped
    in ``spaces.GPU``), from ``state`` (a trainer state; None = a new run). Stops between
    chunks when ``stopped()``; the live preview settings are read at the start of each chunk;
    ``on_state`` receives the trainer state at the end of each chunk."""
    chunk_steps = chunk_steps or int(os.environ.get("STUDIO_CHUNK_STEPS", DEFAULT_CHUNK_STEPS))
    step = int(state["step"]) if state is not None else 0
    while step < total:
        until = min(step + chunk_steps, total)
        band, balance = preview()
        ending: TrainingEvent | None = None
        for item in gpu_call(cfg_dict, photos, state, until, band, balance):
            if isinstance(item, ChunkState):
                state, step = item.state, int(item.state["step"])
                if on_state is not None:
                    on_state(state)
            elif isinstance(item, (TrainingFailed, TrainingFinished)):
                ending = item  # the chunk's state follows it: pass it on once that has arrived
            else:
                yield item
        if ending is not None:
            yield ending
            return
        if stopped():
            return
