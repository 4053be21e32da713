"""The per-session engine: photos, a trainer on a background thread, previews, generation.

Every public method is thread-safe. The UI never touches the trainer: it sends commands
(``start``, ``pause``, ``resume``, ``stop``, ``render_previews``, ``generate`` ...) and reads
immutable :class:`Snapshot`s. Accelerator work of all sessions goes through the process-wide
fair gate (``studio.gate.GATE``), one training step at a time.
"""
from __future__ import annotations

import collections
import enum
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from studio.backbone import Backbone, get_backbone
from studio.concept import Concept
from studio.config import ConfigError, StudioConfig, check_band, config_from_dict
from studio.errors import SessionBusy, StudioError, is_out_of_memory, user_message
from studio.events import ConceptUpdated, PreviewReady, RolledBack, TrainingEvent, TrainingFailed, TrainingFinished, TrainingStep
from studio.gate import GATE, TRAINING_SLOTS, AcceleratorGate, GateCancelled, TrainingSlots
from studio.lora import applied as loras_applied
from studio.metrics import score_quietly
from studio.sampler import GenerationInterrupted, GenerationSettings, SamplerInputError, render_preview, shared_sampler
from studio.sweep import BestStep, SweepSnapshot
from studio.training import EndedRun, TrainingRun

JOIN_TIMEOUT_S = 30.0
_LOG = logging.getLogger(__name__)
_EndedRun = EndedRun  # the old name


class Phase(enum.Enum):
    IDLE = "idle"  # nothing trained yet (a concept may have been imported)
    LOADING = "loading"  # loading the backbone / encoding photos
    TRAINING = "training"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class LossPoint:
    step: int
    loss: float
    rec_loss: float
    te_loss: float
    attention_balance: float | None = None
    cgdr_loss: float = 0.0


class LossHistory(Sequence):
    """The loss curve, append-only and shared by snapshots: each holds the one list and its own
    length, so a training step adds a point instead of copying the whole history (which made
    every step slower than the last). Reads past a snapshot's length never happen."""

    __slots__ = ("_points", "_length")

    def __init__(self, points: list[LossPoint] | None = None, length: int = 0) -> None:
        self._points = points if points is not None else []
        self._length = length

    def appended(self, point: LossPoint) -> LossHistory:
        """This history plus ``point``; shares the list when this is its newest version."""
        if len(self._points) != self._length:  # an older snapshot branching off: copy once
            return LossHistory(self._points[: self._length] + [point], self._length + 1)
        self._points.append(point)
        return LossHistory(self._points, self._length + 1)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(self._points[: self._length][index])
        if not -self._length <= index < self._length:
            raise IndexError("loss history index out of range")
        return self._points[index % self._length]

    def __iter__(self) -> Iterator[LossPoint]:
        return iter(self._points[: self._length])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"LossHistory({self._length} points)"


@dataclass(frozen=True)
class Snapshot:
    """Everything the UI shows about one session, at one moment. Immutable."""

    version: int
    phase: Phase
    step: int = 0
    total: int = 0
    losses: LossHistory = field(default_factory=LossHistory)
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    preview: PreviewReady | None = None
    message: str = ""  # last notice for the user (rollback, failure, stop)
    queue_position: int | None = None  # > 0: waiting behind that many holders of the gate
    concept: Concept | None = None
    prepared: Any = None  # studio.faces.PreparedSet of the current photos
    backbone: str = ""  # what the images come from
    is_random_backbone: bool = False
    best_step: int | None = None  # preview step with the best identity/prompt balance so far
    best_note: str = ""
    sweep: SweepSnapshot | None = None  # the running or last sweep of this session (Explore)
    can_continue: bool = False  # Train more would go on from the last run (same photos and model)
    photo_pool: Any = None  # studio.faces.PreparedSet of every usable upload; ``prepared`` is the chosen part
    best_concept_step: int | None = None  # use_best_step() would return to the concept of this step
    # the running trainer's weights can be previewed before its first concept is published (not
    # on ZeroGPU, where the trainer lives in the GPU process between chunks)
    live_weights: bool = False

    @property
    def active(self) -> bool:
        return self.phase in (Phase.LOADING, Phase.TRAINING, Phase.PAUSED)


class EngineClosed(StudioError, RuntimeError):
    """The session has ended; open the studio again."""


class NoConceptYet(StudioError, ValueError):
    """Nothing has been trained or imported in this session yet."""


class CannotContinue(StudioError, ValueError):
    """Training cannot start or go on as asked (no photos, nothing to continue, photos changed)."""


class Engine:
    """One browser session's work. ``session_id`` names it in the gate's queue."""

    def __init__(self, cfg: StudioConfig, session_id: str = "cli", gate: AcceleratorGate = GATE,
                 slots: TrainingSlots = TRAINING_SLOTS) -> None:
        self.cfg = cfg
        self.session_id = session_id
        self._gate = gate
        self._slots = slots  # server-wide cap on trainings at once
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._snapshot = Snapshot(version=0, phase=Phase.IDLE)
        self._thread: threading.Thread | None = None
        self._run: TrainingRun | None = None  # the training in flight (or the last one)
        self._ended_run: EndedRun | None = None
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._closed = False
        # one Interrupt per kind of run: Create images and Compose each have their own button
        self._cancel = {kind: threading.Event() for kind in ("generation", "composition")}
        self._expected_runs: set[str] = set()  # kinds whose next run keeps an interrupt (expect_run)
        self._best_concept = None  # (step, Concept) of the best-balanced training preview
        self._cancel_sweep = threading.Event()
        self._best = BestStep()  # scored training previews of the current run
        self._scoring_note = ""
        self._step_times: collections.deque[float] = collections.deque(maxlen=20)  # for steps/s and ETA
        self._preview_settings: tuple[tuple[int, int], float] = (tuple(cfg.sample.band), cfg.sample.balance)
        self.loras: tuple = ()  # style LoRAs (studio.lora.LoraUse) for this session's images only

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> Snapshot:
        """The latest immutable state (queue position filled in live)."""
        with self._lock:
            snap = self._snapshot
        position = self._gate.position(self.session_id)
        return replace(snap, queue_position=position) if position else snap

    def wait_for_change(self, version: int, timeout: float = 0.5) -> Snapshot:
        """Block until the snapshot's version is newer than ``version`` (or ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self._snapshot.version > version or self._closed, timeout=timeout)
        return self.snapshot()

    def wait_until(self, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """Block until ``predicate(snapshot)`` holds; raises TimeoutError. For tests and the CLI."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self._snapshot):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"engine state still {self._snapshot.phase.value} at step {self._snapshot.step}")
                self._changed.wait(timeout=left)
            return self._snapshot

    def _publish(self, **changes: Any) -> None:
        with self._changed:
            self._snapshot = replace(self._snapshot, version=self._snapshot.version + 1, **changes)
            self._changed.notify_all()

    def configure(self, cfg: StudioConfig) -> None:
        """Switch preset / base model; refused while training. The photos stay."""
        with self._lock:
            if self._snapshot.active:
                raise SessionBusy("Stop training before switching the preset or model.")
            if cfg.model != self.cfg.model:
                self._ended_run = None  # its state belongs to the other model
            self.cfg = cfg
            self._publish(backbone="", is_random_backbone=cfg.model.is_tiny, can_continue=self._continuable(self._snapshot.prepared))

    # ------------------------------------------------------------------ backbone
    def backbone(self, cfg: StudioConfig | None = None) -> Backbone:
        """The shared backbone for ``cfg`` (default: this session's), loaded on first use."""
        backbone = get_backbone((cfg or self.cfg).model)
        if cfg is None or cfg is self.cfg:
            with self._lock:
                if not self._snapshot.backbone:
                    self._publish(backbone=backbone.describe(), is_random_backbone=backbone.is_random)
        return backbone

    # ------------------------------------------------------------------ photos
    def prepare_photos(self, sources: Sequence[Any]):
        """Detect, align and mask faces; on failure the previous photos stay. Returns the PreparedSet."""
        self._check_open()
        from studio.faces import get_face_analyzer, prepare

        pool = prepare(list(sources), self.cfg.face, get_face_analyzer(self.cfg.face))
        # Photos that probably show someone else are left out unless all are (nothing says who is meant).
        chosen = [i for i in range(len(pool.photos)) if i not in pool.outliers] or list(range(len(pool.photos)))
        self._publish_photos(pool, pool.only(chosen))
        return pool

    def choose_photos(self, names: Sequence[str]) -> None:
        """Train on these of the uploaded usable photos (by name); at least one."""
        with self._lock:
            pool = self._snapshot.photo_pool
            if pool is None:
                return
            chosen = [i for i, photo in enumerate(pool.photos) if photo.name in set(names)]
            if not chosen:
                raise CannotContinue("Keep at least one photo ticked to train on.")
            self._publish_photos(pool, pool.only(chosen))

    def clear_photos(self) -> None:
        """Forget the photos (the upload box was emptied): nothing is trained on them any more."""
        with self._lock:
            self._publish_photos(None, None)

    def _publish_photos(self, pool, prepared) -> None:
        """New photos: Train more stays possible only if they are the ones the last run used."""
        with self._lock:
            can_continue = self._continuable(prepared)
            message = self._snapshot.message
            if self._snapshot.can_continue and not can_continue and not self._snapshot.active:
                message = "The photos changed since the last training: Train learns a new concept from these."
            self._publish(photo_pool=pool, prepared=prepared, can_continue=can_continue, message=message)

    def _continuable(self, prepared) -> bool:
        from studio.trainer import StateMismatch, TrainingPhoto, check_same_run, run_identity

        run = self._ended_run
        if run is None or prepared is None or not prepared.photos:
            return False
        photos = [TrainingPhoto.from_prepared(photo) for photo in prepared.photos]
        try:
            check_same_run(run.state.get("run"), run_identity(run.backbone, run.cfg, photos))
        except StateMismatch:
            return False
        return True

    # ------------------------------------------------------------------ training commands
    def start(
        self,
        overrides: dict[str, Any] | None = None,
        *,
        foreground: bool = False,
        gpu_call: Callable[..., Any] | None = None,
    ) -> Iterator[Snapshot] | None:
        """Start training a new concept from the current photos, with dotted-key overrides.

        By default a background thread trains and this returns at once. With ``foreground``
        the caller drives training by iterating the returned snapshots (ZeroGPU, where only a
        request handler may use the GPU); ``gpu_call`` then runs chunks of steps (studio.runner).
        """
        self._check_open()
        with self._lock:
            self._check_idle()
            prepared = self._usable_photos()
            cfg = self.cfg.replace(**overrides) if overrides else self.cfg
            self._slots.claim(self.session_id)  # StudioBusy before anything of this session changes
            self._ended_run = None
            self._best = BestStep()
            self._best_concept = None
            self._publish(
                phase=Phase.LOADING, step=0, total=cfg.train.steps, losses=LossHistory(), steps_per_second=None,
                eta_seconds=None, message="", best_step=None, best_note="", can_continue=False, best_concept_step=None,
            )
            return self._launch(cfg, prepared, None, foreground, gpu_call)

    def continue_training(
        self,
        more_steps: int,
        *,
        foreground: bool = False,
        gpu_call: Callable[..., Any] | None = None,
    ) -> Iterator[Snapshot] | None:
        """Train the last finished or stopped run ``more_steps`` further, exactly as if it had
        been asked for that many steps at first (same settings, photos and random streams).
        Raises ValueError when there is no such run or its photos or model have changed."""
        from studio.trainer import StateMismatch, TrainingPhoto

        self._check_open()
        if int(more_steps) < 1:
            raise CannotContinue(f"Continue by at least one step (got {more_steps}).")
        with self._lock:
            self._check_idle()
            run = self._ended_run
            if run is None:
                raise CannotContinue(
                    "There is no training to continue in this session (or the base model changed since): press Train."
                )
            prepared = self._usable_photos()
            try:
                cfg = run.continued(more_steps, [TrainingPhoto.from_prepared(photo) for photo in prepared.photos])
            except StateMismatch:
                raise CannotContinue(
                    "The photos changed since the last training, so it cannot continue: press Train to learn "
                    "a new concept from these photos."
                ) from None
            self._slots.claim(self.session_id)
            self._publish(
                phase=Phase.LOADING, step=run.step, total=cfg.train.steps, steps_per_second=None, eta_seconds=None,
                message=f"Continuing from step {run.step} to {cfg.train.steps}.",
            )
            return self._launch(cfg, prepared, run.state, foreground, gpu_call)

    def _check_idle(self) -> None:
        if self._thread is not None and self._thread.is_alive() or self._snapshot.active:
            raise SessionBusy("Training is already running: stop it first, or pause/resume it.")

    def _usable_photos(self):
        prepared = self._snapshot.prepared
        if prepared is None or not prepared.photos:
            raise CannotContinue("Add at least one photo with a detectable face before training.")
        return prepared

    def _launch(self, cfg: StudioConfig, prepared, state: dict[str, Any] | None, foreground: bool,
                gpu_call: Callable[..., Any] | None) -> Iterator[Snapshot] | None:
        """Run the driver on a background thread, or hand it to a foreground caller (under the lock).
        The caller has claimed a training slot; the run gives it back when it ends."""
        self._stop.clear()
        self._resume.set()
        self._step_times.clear()
        self._run = None
        driver = self._holding_slot(self._drive(cfg, prepared, state, gpu_call))
        if foreground:
            return self._follow(driver)
        self._thread = threading.Thread(
            target=_run_to_end, args=(driver,), name=f"trainer-{self.session_id[:8]}", daemon=True
        )
        self._thread.start()
        return None

    def _holding_slot(self, driver: Iterator[None]) -> Iterator[None]:
        try:
            yield from driver
        finally:
            self._slots.release(self.session_id)

    def _follow(self, driver: Iterator[None]) -> Iterator[Snapshot]:
        for _ in driver:
            yield self.snapshot()
        yield self.snapshot()

    def pause(self) -> None:
        with self._lock:
            if self._snapshot.phase is Phase.TRAINING:
                self._resume.clear()
                self._publish(phase=Phase.PAUSED, message="Paused. Resume continues exactly where it stopped.")

    def resume(self) -> None:
        with self._lock:
            if self._snapshot.phase is Phase.PAUSED:
                self._resume.set()
                self._publish(phase=Phase.TRAINING, message="")

    def stop(self) -> None:
        """Stop training after the current step; the concept so far is kept. Generations and
        sweeps of this session go on (they end with the session, see close())."""
        with self._lock:
            if self._snapshot.active and not self._stop.is_set():  # the page shows it at once
                self._publish(message="Stopping after this step…")
            self._stop.set()
            self._resume.set()

    def set_preview_settings(self, band: tuple[int, int], balance: float) -> None:
        """Band and balance used by the trainer's next periodic previews."""
        band = check_band(band, "interval")
        if not balance > 0:
            raise SamplerInputError(f"The tandem balance must be above 0, got {balance}.")
        with self._lock:
            self._preview_settings = (band, float(balance))
            if self._run is not None:
                self._run.set_preview(band, float(balance))

    def _drive(self, cfg: StudioConfig, prepared, state: dict[str, Any] | None,
               gpu_call: Callable[..., Any] | None) -> Iterator[None]:
        """Pump a TrainingRun's events into snapshots, one gated step at a time; yields after each.
        Starts from ``state`` (a trainer state) when given; keeps the end for continue_training."""
        from studio.trainer import TrainingPhoto

        run = None
        try:
            backbone = self.backbone(cfg)
            run = TrainingRun(
                backbone, cfg, [TrainingPhoto.from_prepared(photo) for photo in prepared.photos], state=state,
                sampler=shared_sampler(backbone), gpu_call=gpu_call, stop_requested=self._stop.is_set,
                preview=self._preview_settings,
            )
            with self._lock:
                self._run = run
            if not run.chunked:
                with self._gate.hold(self.session_id, cancelled=self._stop.is_set):
                    run.build()
            events = run.events()
            self._publish(phase=Phase.TRAINING, backbone=backbone.describe(), is_random_backbone=backbone.is_random,
                          live_weights=not run.chunked)
            yield
            while not run.stop_lands_now():
                self._resume.wait()
                if run.stop_lands_now():
                    break
                with self._gate.hold(self.session_id, cancelled=run.stop_lands_now):
                    event = next(events, None)
                    if isinstance(event, PreviewReady):
                        event = self._with_scores(event, cfg, cfg.concept.super_category)
                if event is None:
                    break
                if isinstance(event, (TrainingFinished, TrainingFailed)):
                    self._keep_ended_run(run)
                self._on_event(event)
                yield
                if isinstance(event, (TrainingFinished, TrainingFailed)):
                    return
            events.close()
            self._finish_stopped(run)
        except GateCancelled:  # stopped while waiting for the gate
            self._finish_stopped(run)
        except GeneratorExit:  # a foreground caller walked away (its request was cancelled)
            self._finish_stopped(run)
            raise
        except Exception as exc:  # training must always end in a state the UI can show
            message = user_message(exc, context=f"training in session {self.session_id}")  # logs what is unexpected
            self._on_event(TrainingFailed(self._snapshot.step, message, kind="oom" if is_out_of_memory(exc) else "error"))
        yield

    def _keep_ended_run(self, run: TrainingRun | None) -> None:
        """Remember where ``run`` ended, for continue_training (stopped before any step: nothing new)."""
        ended = run.ended() if run is not None else None
        if ended is not None:
            with self._lock:
                self._ended_run = ended
                self._snapshot = replace(self._snapshot, can_continue=self._continuable(self._snapshot.prepared))

    def _finish_stopped(self, run: TrainingRun | None) -> None:
        """End a stopped run: keep where it ended (continue_training), then report it."""
        self._keep_ended_run(run)
        if run is None:
            snap = self._snapshot
            self._on_event(TrainingFinished(snap.step, snap.total, snap.concept, stopped=True))
            return
        self._on_event(run.stopped_event(self._snapshot.concept))

    def _on_event(self, event: TrainingEvent) -> None:
        with self._lock:
            if isinstance(event, TrainingStep):
                self._step_times.append(event.seconds)
                rate = len(self._step_times) / max(sum(self._step_times), 1e-9)
                point = LossPoint(
                    event.step, event.loss, event.rec_loss, event.te_loss, event.attention_balance, event.cgdr_loss
                )
                self._publish(
                    step=event.step, total=event.total, losses=self._snapshot.losses.appended(point),
                    steps_per_second=rate, eta_seconds=(event.total - event.step) / rate,
                )
            elif isinstance(event, PreviewReady):
                self._publish(preview=event, **self._best_step_update(event))
            elif isinstance(event, ConceptUpdated):
                self._publish(concept=event.concept)
            elif isinstance(event, RolledBack):
                self._publish(message=f"Step {event.step}: {event.reason}; rolled back to step {event.restored_step}.")
            elif isinstance(event, TrainingFinished):
                phase = Phase.STOPPED if event.stopped else Phase.FINISHED
                text = f"Stopped at step {event.step} of {event.total}." if event.stopped else f"Finished {event.total} steps."
                if event.step > 0:
                    text += " Train more goes on from here."
                self._publish(phase=phase, step=event.step, concept=event.concept or self._snapshot.concept, message=text, eta_seconds=None)
            elif isinstance(event, TrainingFailed):
                self._publish(phase=Phase.FAILED, message=event.message, eta_seconds=None)

    # ------------------------------------------------------------------ concepts
    def current_concept(self) -> Concept | None:
        """The newest weights: a fresh snapshot of a running trainer, else the last concept."""
        with self._lock:
            run, concept = self._run, self._snapshot.concept
        if run is not None and run.trainer is not None and self._snapshot.active:
            with self._gate.hold(self.session_id):
                return run.concept()
        return concept

    def _require_concept(self, purpose: str) -> Concept:
        """The newest concept, or NoConceptYet with a sentence naming what it was needed for."""
        concept = self.current_concept()
        if concept is None:
            raise NoConceptYet(f"There is no concept yet: train one (or import a concept file) before {purpose}.")
        return concept

    def import_concept(self, source: str | Path | bytes) -> Concept:
        """Load a concept file; on error the current concept stays. When the file carries its
        trainer state, that run can go on here (continue_training, with the same photos)."""
        self._check_open()
        from studio.concept_file import ConceptFileError, load_concept, read_training_state

        backbone = self.backbone()
        try:
            concept = load_concept(source, backbone)
        except (StudioError, RuntimeError):  # said plainly already, or the accelerator's (out of memory)
            raise
        except Exception as exc:  # nothing a file holds may end in a traceback; the concept stays
            _LOG.exception("unexpected error importing a concept in session %s", self.session_id)
            raise ConceptFileError(
                f"This concept file could not be read because of an unexpected problem ({type(exc).__name__}); "
                f"the current concept is kept."
            ) from None
        message = f"Imported a concept trained for {concept.steps_done} steps."
        try:
            state = read_training_state(source)
        except ConceptFileError as exc:  # the concept itself is fine: keep it, say what is lost
            state = None
            message += f" Its training state is unusable, so training cannot go on from it: {exc}"
        run = None
        if state is not None and concept.config:
            try:
                # The file's settings are data; what to load (model, face models, CLIP) is the server's.
                run_cfg = replace(config_from_dict(concept.config), model=self.cfg.model, face=self.cfg.face,
                                  metrics=self.cfg.metrics)
            except ConfigError:
                run_cfg = None  # settings of another studio version: the concept works, continuing does not
            if run_cfg is not None:
                run = EndedRun(run_cfg, backbone, state)
                message += " Its training can go on here: add the same photos and press Train more."
        with self._lock:
            if self._snapshot.active:
                raise SessionBusy("Stop training before importing a concept.")
            self._ended_run = run
            self._best_concept = None
            self._publish(concept=concept, step=concept.steps_done, total=concept.steps_done, message=message,
                          can_continue=self._continuable(self._snapshot.prepared), best_step=None, best_note="",
                          best_concept_step=None)
        return concept

    def export_concept(self, path: str | Path) -> Path:
        """Save the newest concept; after a finished or stopped run it also carries the trainer
        state, so that another session can continue it."""
        from studio.concept_file import save_concept

        concept = self._require_concept("exporting")
        with self._lock:
            run = self._ended_run
            state = run.state if run is not None and not self._snapshot.active and run.step == concept.steps_done else None
            band, balance = self._preview_settings
        # the trade-off sliders' values travel with the file, so an import restores them
        sample = {**concept.config.get("sample", {}), "band": list(band), "balance": balance}
        save_concept(replace(concept, config={**concept.config, "sample": sample}), path, training_state=state)
        return Path(path)

    # ------------------------------------------------------------------ images
    def render_previews(self, band: tuple[int, int] | None = None, balance: float | None = None) -> PreviewReady:
        """Re-render the preview prompts with the newest weights (slider moves; 'Preview now').

        ``band`` / ``balance`` also become the live settings of the trainer's next previews.
        """
        self._check_open()
        sample = self.cfg.sample
        with self._lock:  # the values set are the values rendered, whatever another request sets
            if band is not None or balance is not None:
                self.set_preview_settings(band or tuple(sample.band), sample.balance if balance is None else balance)
            band, balance = self._preview_settings
        concept = self._require_concept("previewing")
        sampler = shared_sampler(self.backbone())
        with self._gate.hold(self.session_id), loras_applied(sampler.backbone, self.loras):
            preview = render_preview(sampler, concept, self.cfg, band, balance)
            preview = self._with_scores(preview, self.cfg, concept.super_category)
        self._publish(preview=preview)
        return preview

    def _generation_steps(self, progress: Callable[[int, int], None] | None, kind: str) -> Callable[[int, int], bool]:
        """The per-step callback of a ``kind`` run ("generation" or "composition"): reports progress
        and says whether to stop (interrupt_generation / interrupt_composition). A past interrupt
        does not stop this one, unless it came after ``expect_run(kind)``."""
        cancel = self._cancel[kind]
        with self._lock:
            if not self._closed and kind not in self._expected_runs:
                cancel.clear()
            self._expected_runs.discard(kind)

        def on_step(i: int, total: int) -> bool:
            if progress is not None:
                progress(i, total)
            return cancel.is_set()

        return on_step

    @contextmanager
    def _generation_gate(self, settings: GenerationSettings, kind: str):
        """This session's turn on the accelerator for a ``kind`` run; its Interrupt while it waits
        in line ends it as GenerationInterrupted after 0 steps."""
        try:
            with self._gate.hold(self.session_id, cancelled=self._cancel[kind].is_set):
                yield
        except GateCancelled:  # only the wait raises it: the gate is not held
            raise GenerationInterrupted(0, settings.num_inference_steps) from None

    def generate(self, prompt: str | list[str], *, progress: Callable[[int, int], None] | None = None,
                 concept: Concept | None = None, **kwargs: Any):
        """Generate with ``concept`` (default: the newest). kwargs as ``Sampler.__call__`` (seeds, band, balance, ...)."""
        self._check_open()
        concept = concept or self._require_concept("generating")
        sampler = shared_sampler(self.backbone())
        on_step = self._generation_steps(progress, "generation")
        settings = GenerationSettings.from_config(self.cfg, **kwargs)
        with self._generation_gate(settings, "generation"), loras_applied(sampler.backbone, self.loras):
            result = sampler(concept, prompt, callback_on_step_end=on_step, **settings.kwargs())
            per_image = [settings["prompt"] for settings in result.settings]
            scores = self._score(result.images, per_image, concept.super_category, self.cfg)
        if scores:
            # scores first: a gallery cuts a long caption short, and they are what is compared
            result = replace(result, captions=[f"{s.caption} · {c}" for c, s in zip(result.captions, scores)])
        return result

    def compose(self, sources: Sequence[Any], prompt: str, *, mode: str = "regions", boxes: Any = None,
                progress: Callable[[int, int], None] | None = None, **kwargs: Any):
        """Several people in one picture (docs/COMPOSE.md): ``sources`` are studio.compose.PersonSource
        per {0}, {1}, ...; kwargs as ``Sampler.__call__``. Returns (ComposeResult, identity per region
        per image, or () when scoring is off)."""
        self._check_open()
        from studio.compose import Composer, resolve_people, score_regions

        on_step = self._generation_steps(progress, "composition")  # armed first: an Interrupt while the files load counts
        backbone = self.backbone()
        people, references = resolve_people(
            sources, concept=self.current_concept(), prepared=self._snapshot.prepared, backbone=backbone,
            face=self.cfg.face, class_word=self.cfg.concept.super_category,
        )
        composer = Composer(shared_sampler(backbone), self.cfg.compose)
        if kwargs.get("height") is None and kwargs.get("width") is None:  # no size asked for: the people's picture
            kwargs["height"], kwargs["width"] = composer.canvas(self.cfg.image_size, len(people))
        settings = GenerationSettings.from_config(self.cfg, **kwargs)
        with self._generation_gate(settings, "composition"), loras_applied(backbone, self.loras):
            result = composer(people, prompt, mode=mode, boxes=boxes, callback_on_step_end=on_step, **settings.kwargs())
            scores = ()
            if self.cfg.metrics.score_images:
                analyzer = self._scorer(self.cfg).analyzer if any(references) else None  # loads face models only when needed
                scores = score_regions(result, references, analyzer)
        return result, scores

    def instant_preview(self, prompt: str | None = None, *, progress: Callable[[int, int], None] | None = None, **kwargs: Any):
        """A likeness from the prepared photos before any training (reference-aware self-attention
        with the first photo); ``prompt`` names the person {0} (default: the first preview prompt)."""
        from studio.compose import PersonSource

        prompt = prompt or self.cfg.sample.preview_prompts[0].replace("{}", "{0}")
        return self.compose([PersonSource("photos")], prompt, progress=progress, **kwargs)

    def expect_run(self, kind: str) -> None:
        """A ``kind`` run ("generation" or "composition") has been asked for and starts soon: an
        interrupt from now on stops it, even one that comes before the run itself has begun (a
        page enables its Interrupt button as it asks)."""
        with self._lock:
            if not self._closed:
                self._cancel[kind].clear()
                self._expected_runs.add(kind)

    def interrupt_generation(self) -> None:
        """Stop this session's generation after the denoising step in flight (GenerationInterrupted)."""
        self._cancel["generation"].set()

    def interrupt_composition(self) -> None:
        """Stop this session's composition or instant preview after the step in flight; a
        generation running beside it goes on."""
        self._cancel["composition"].set()

    # ------------------------------------------------------------------ scores and sweeps
    def _scorer(self, cfg: StudioConfig):
        from studio.metrics import Scorer

        return Scorer.for_backbone(self.backbone(cfg), cfg.face, cfg.metrics.clip_model)

    def references(self) -> list:
        """Identity embeddings (D,) of the session's usable photos: what identity is scored against."""
        prepared = self._snapshot.prepared
        return [photo.embedding for photo in prepared.photos] if prepared is not None else []

    def _score(self, images, prompts: list[str], super_category: str, cfg: StudioConfig) -> tuple:
        """ImageScores per image, or () when scoring is off or its models cannot load (said once)."""
        if not cfg.metrics.score_images:
            return ()
        scores, problem = score_quietly(lambda: self._scorer(cfg), images, prompts, self.references(), super_category)
        if problem and not self._scoring_note:
            self._scoring_note = problem
            self._publish(message=problem)
        return scores

    def _with_scores(self, preview: PreviewReady, cfg: StudioConfig, word: str) -> PreviewReady:
        """``preview`` with ImageScores per image (identity vs the session's photos, prompt via CLIP)."""
        prompts = [p for p in cfg.sample.preview_prompts for _ in cfg.sample.preview_seeds]
        scores = self._score(preview.images, prompts, word, cfg)
        return replace(preview, scores=scores) if scores else preview

    def _best_step_update(self, preview: PreviewReady) -> dict[str, Any]:
        """Track scored training previews and mark the step with the best balance of both scores."""
        if not preview.scores or not self._snapshot.active:
            return {}
        self._best = self._best.with_preview(preview)
        if self._best.step == preview.step:  # on the driving thread, between steps: the trainer is still
            run = self._run
            concept = run.concept() if run is not None else None
            concept = concept or self._snapshot.concept
            if concept is not None:
                self._best_concept = (preview.step, concept)
        update = {"best_step": self._best.step, "best_note": self._best.note}
        if self._best_concept is not None:
            update["best_concept_step"] = self._best_concept[0]
        return update

    def use_best_step(self) -> Concept:
        """Make the concept of the best-balanced training preview the current one (after training)."""
        with self._lock:
            if self._snapshot.active:
                raise SessionBusy("Stop training before going back to the best step.")
            if self._best_concept is None:
                raise NoConceptYet("No best step is known yet: it is found from the scored previews while training.")
            step, concept = self._best_concept
            self._publish(concept=concept, message=f"Using the concept of step {step} (the best balance). "
                          "Train more still goes on from the end of the run.")
            return concept

    def sweep(
        self,
        prompts: list[str],
        seeds: list[int],
        bands: list[tuple[int, int]],
        balances: list[float],
        *,
        steps: int | None = None,
    ) -> Iterator:
        """Generate + score every (band, balance) with the newest concept; the returned iterator
        yields SweepPoints as they finish, and each one is also published as ``Snapshot.sweep``
        (a SweepSnapshot: running, then done / stopped / failed). ``cancel_sweep()`` ends it
        after the current denoising step (points so far stand). Checks (NoConceptYet, a sweep
        already running: SessionBusy) happen here, at the call."""
        self._check_open()
        concept = self._require_concept("exploring")
        with self._lock:
            if self._snapshot.sweep is not None and not self._snapshot.sweep.finished:
                raise SessionBusy("A sweep is already running in this session: stop it first.")
            self._cancel_sweep.clear()
            started = SweepSnapshot(
                bands=tuple(bands), balances=tuple(balances), prompts=tuple(prompts), seeds=tuple(seeds),
                steps=steps or self.cfg.sample.preview_steps, references=len(self.references()),
                random_backbone=self._snapshot.is_random_backbone,
            )
            self._publish(sweep=started)
        return _ClosingIterator(self._sweep_points(concept, started), on_close=self._sweep_abandoned)

    def _sweep_abandoned(self) -> None:
        """A sweep iterator closed before it began (a cancelled stream) still ends as stopped."""
        self._update_sweep(lambda current: current if current.finished else current.ended("stopped"))

    def _sweep_points(self, concept: Concept, asked: SweepSnapshot) -> Iterator:
        from studio.sweep import sweep

        sampler = shared_sampler(self.backbone())

        def gated_sampler(*args: Any, **kwargs: Any):
            with self._gate.hold(self.session_id, cancelled=self._cancel_sweep.is_set), loras_applied(sampler.backbone, self.loras):
                return sampler(*args, **kwargs)

        settings = GenerationSettings.from_config(self.cfg, num_inference_steps=asked.steps)
        ending, error = "done", ""
        try:
            for point in sweep(
                gated_sampler, concept, list(asked.prompts), list(asked.seeds), list(asked.bands), list(asked.balances),
                self._scorer(self.cfg), self.references(), settings=settings, should_stop=self._cancel_sweep.is_set,
            ):
                self._update_sweep(lambda current: current.with_point(point))
                yield point
        except GateCancelled:  # cancelled while waiting for the accelerator
            pass
        except Exception as exc:
            ending, error = "failed", user_message(exc, context=f"sweeping in session {self.session_id}")
            raise
        finally:  # also when the caller stops iterating (a cancelled stream closes the generator)
            if ending == "done" and (self._cancel_sweep.is_set() or self._closed):
                ending = "stopped"
            self._update_sweep(lambda current: current.ended(ending, error))

    def _update_sweep(self, change: Callable[[SweepSnapshot], SweepSnapshot]) -> None:
        with self._lock:
            if self._snapshot.sweep is not None and not self._closed:
                self._publish(sweep=change(self._snapshot.sweep))

    def cancel_sweep(self) -> None:
        self._cancel_sweep.set()

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("This session has ended; reload the page to start a new one.")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop training, free the session's memory. Idempotent; safe from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop()
        for cancel in self._cancel.values():
            cancel.set()
        self._cancel_sweep.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=JOIN_TIMEOUT_S)
        self._slots.release(self.session_id)  # a foreground run its caller never drove
        with self._lock:
            self._run = None
            self._thread = None
            self._publish(phase=Phase.CLOSED, concept=None, preview=None, prepared=None, losses=LossHistory())
        gc.collect()


class _ClosingIterator(Iterator):
    """``iterator`` whose close() also calls ``on_close`` (a generator closed before its first
    item runs no ``finally``)."""

    def __init__(self, iterator: Iterator, on_close: Callable[[], None]) -> None:
        self._iterator, self._on_close = iterator, on_close

    def __next__(self):
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()
        self._on_close()


def _run_to_end(driver: Iterator[None]) -> None:
    for _ in driver:
        pass


_user_message = user_message  # the old name, for callers not yet moved to studio.errors.user_message
