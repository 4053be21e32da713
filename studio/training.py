"""One training path (docs/ARCHITECTURE.md, "Training"): build or resume a Trainer, drive its
steps from a local or a chunked source, keep where it ended, and say what "stop" means.

The engine (a session's background thread, or a ZeroGPU request handler), the ZeroGPU chunk
function (studio/runner.py) and the CLI all train through :class:`TrainingRun`; none of them
builds a Trainer or reads its state on its own.

- Local source: one Trainer in this process; a stop lands after the step in flight.
- Chunked source: ``gpu_call`` runs ``studio.runner.training_chunk`` (in ZeroGPU's forked GPU
  process); each chunk rebuilds the trainer from the previous chunk's CPU state, so a stop
  lands when the chunk in flight ends (only then do its weights come back).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from studio.backbone import Backbone
from studio.concept import Concept
from studio.config import StudioConfig
from studio.events import TrainingEvent, TrainingFailed, TrainingFinished
from studio.trainer import PreviewSampler, Trainer, TrainingPhoto, check_same_run, run_identity

# A ZeroGPU call is billed against a daily quota: keep each chunk short.
DEFAULT_CHUNK_STEPS = 50

PreviewSettings = tuple[tuple[int, int], float]  # (band, balance) of the trainer's next previews


def to_cpu(value: Any) -> Any:
    """A copy of a (nested) trainer state with every tensor on the CPU (picklable, device-free)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


@dataclass(frozen=True)
class ChunkState:
    """End of one chunk: the trainer state (CPU tensors) to continue from."""

    state: dict[str, Any]


@dataclass(frozen=True)
class EndedRun:
    """Where a training ended, kept so that it can go on: its settings, backbone and trainer
    state (CPU tensors)."""

    cfg: StudioConfig
    backbone: Backbone
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def continued(self, more_steps: int, photos: Sequence[TrainingPhoto]) -> StudioConfig:
        """The settings that train ``more_steps`` further, exactly as if that many had been asked
        for at first; StateMismatch when ``photos`` are not the ones it was trained on."""
        cfg = self.cfg.replace(**{"train.steps": self.step + int(more_steps)})
        check_same_run(self.state.get("run"), run_identity(self.backbone, cfg, photos))
        return cfg


def chunked_events(
    gpu_call: Callable[..., Iterator[Any]],
    cfg_dict: dict[str, Any],
    photos: Sequence[Any],
    total: int,
    preview: Callable[[], PreviewSettings],
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


class TrainingRun:
    """One training of ``photos`` with ``cfg``, from the start or from a trainer ``state``.

    ``gpu_call`` None trains locally (call :meth:`build` first, e.g. under the accelerator
    gate); otherwise in chunks through ``gpu_call``. ``stop_requested`` is polled: see
    :meth:`stop_lands_now`. Iterate :meth:`events`; afterwards :meth:`ended` is where it ended.
    """

    def __init__(
        self,
        backbone: Backbone,
        cfg: StudioConfig,
        photos: Sequence[TrainingPhoto],
        *,
        state: dict[str, Any] | None = None,
        sampler: PreviewSampler | None = None,
        gpu_call: Callable[..., Iterator[Any]] | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        preview: PreviewSettings | None = None,
    ) -> None:
        self.backbone, self.cfg, self.photos = backbone, cfg, list(photos)
        self.trainer: Trainer | None = None
        self._state = state  # the start; in chunks, the state after the latest chunk
        self._sampler, self._gpu_call, self._stop_requested = sampler, gpu_call, stop_requested
        self._preview: PreviewSettings = preview or (tuple(cfg.sample.band), cfg.sample.balance)

    @property
    def chunked(self) -> bool:
        return self._gpu_call is not None

    def build(self) -> Trainer | None:
        """Build (and resume) the local Trainer; a chunked run builds its trainers in the chunks."""
        if self.chunked or self.trainer is not None:
            return self.trainer
        trainer = Trainer(self.backbone, self.cfg, self.photos, sampler=self._sampler)
        if self._state is not None:
            trainer.load_state_dict(self._state)  # StateMismatch names what differs
        trainer.preview_band, trainer.preview_balance = self._preview
        self.trainer = trainer
        return trainer

    def set_preview(self, band: tuple[int, int], balance: float) -> None:
        """Band and balance of the next previews (a chunked run reads them at each chunk's start)."""
        if self.trainer is not None:
            self.trainer.preview_band, self.trainer.preview_balance = band, balance
        self._preview = (band, float(balance))

    def events(self, until: int | None = None) -> Iterator[TrainingEvent]:
        """The run's events (``until``: the step to end at, local runs only)."""
        if not self.chunked:
            return self.build().run(until=until)
        return chunked_events(
            self._gpu_call, self.cfg.to_dict(), self.photos, self.cfg.train.steps,
            preview=lambda: self._preview, stopped=self._stop_requested, state=self._state,
            on_state=self._keep_chunk_state,
        )

    def _keep_chunk_state(self, state: dict[str, Any]) -> None:
        self._state = state

    def stop_lands_now(self) -> bool:
        """Whether a requested stop ends the run before its next event: locally yes (after the
        step in flight); in chunks no, the chunk source itself stops when the chunk ends."""
        return not self.chunked and self._stop_requested()

    @property
    def step(self) -> int:
        if self.trainer is not None:
            return self.trainer.step
        return int(self._state["step"]) if self._state is not None else 0

    def concept(self) -> Concept | None:
        """The newest weights: the local trainer's; None in chunks (they arrive as ConceptUpdated)."""
        return self.trainer.concept() if self.trainer is not None else None

    def end_state(self) -> dict[str, Any] | None:
        """The trainer state where the run is now (CPU tensors): the local trainer's (call it
        between steps), else the last chunk's, else the state it started from."""
        return to_cpu(self.trainer.state_dict()) if self.trainer is not None else self._state

    def ended(self) -> EndedRun | None:
        """Where the run ended, for training more later; None when no state exists yet."""
        state = self.end_state()
        return EndedRun(self.cfg, self.backbone, state) if state is not None else None

    def stopped_event(self, concept: Concept | None = None) -> TrainingFinished:
        """The TrainingFinished of a run stopped before its last step (``concept``: what to report
        when the run holds no trainer, e.g. the last ConceptUpdated of a chunked run)."""
        return TrainingFinished(self.step, self.cfg.train.steps, self.concept() or concept, stopped=True)
