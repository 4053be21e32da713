"""The training loop (docs/ALGORITHM.md, "Losses"): no threads, no UI, no printing; it emits typed events.

A :class:`Trainer` owns one mapper, its optimiser and its random streams. Everything that does
not change during training (VAE latents, masks, the image embedding, tokenised prompts) is
computed once in the constructor. :meth:`Trainer.run` is a generator: stop iterating to pause,
iterate a new ``run()`` to resume; each event is yielded only once the trainer is consistent.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from studio.backbone import Backbone, check_prediction_type, seeded_init
from studio.concept import Concept
from studio.conditioning import encode_text, super_category_id, tokenize
from studio.config import StudioConfig, check_band
from studio.errors import OUT_OF_MEMORY_MESSAGE, StudioError, is_out_of_memory
from studio.events import PreviewReady, RolledBack, TrainingEvent, TrainingFailed, TrainingFinished, TrainingStep
from studio.losses import TandemEquilibriumLoss, masked_mse, prompt_lengths
from studio.mapper import build_mapper
from studio.prompts import RECONSTRUCTION_TEMPLATES, TANDEM_PROMPTS

# Consecutive rollbacks after which training gives up (the learning rate is too high).
MAX_ROLLBACKS_IN_ROW = 3
# Rollbacks in one run (good steps in between do not reset it) after which training gives up:
# a learning rate that diverges every few steps would otherwise roll back forever.
MAX_ROLLBACKS_PER_RUN = 10
# A TE weight above this is blamed for a diverging loss rather than the learning rate.
TE_WEIGHT_SUSPECT = 10.0
# fp16 only: steps the GradScaler may skip in a row while it searches for a usable scale.
MAX_SCALER_SKIPS = 16
STATE_FORMAT = 1
# Training settings a saved state stays valid without: how long to train and how often to look.
_RESUMABLE_CHANGES = frozenset({"steps", "preview_every", "snapshot_every"})


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class TrainingPhoto:
    """One training photo.

    image: RGB, square, any size (resized to ``train.resolution``).
    mask: (H, W) float soft face mask in [0, 1], same framing as ``image``; None = whole image.
    """

    image: Image.Image
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image.width != self.image.height:
            raise ValueError(f"training photos must be square, got {self.image.width}x{self.image.height}")
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise ValueError(f"a face mask must be 2-D (H, W), got shape {mask.shape}")
            if not mask.max(initial=0) > 0:
                raise ValueError("the face mask is empty: nothing of the photo would be learned")

    @classmethod
    def from_prepared(cls, prepared: Any) -> TrainingPhoto:
        """From a face-prepared photo: anything with ``.crop`` (PIL) and ``.mask`` (array, PIL or None)."""
        return cls(image=prepared.crop.convert("RGB"), mask=_float_mask(prepared.mask))

    def jittered(self, rng: random.Random, jitter: float, flip: bool) -> TrainingPhoto:
        """A random zoom-in view: a square of (1 - s) of the side, s uniform in [0, ``jitter``], at a
        random place, resized back to this photo's size; mirrored left-right half the time when
        ``flip``. The mask is cut the same way (docs/ALGORITHM.md, "Views of the photos")."""
        side = self.image.width
        crop = side * (1.0 - rng.uniform(0.0, jitter))
        left, top = rng.uniform(0.0, side - crop), rng.uniform(0.0, side - crop)
        box = (left, top, left + crop, top + crop)
        image = self.image.resize((side, side), Image.Resampling.BICUBIC, box=box)
        mask = None
        if self.mask is not None:
            full = Image.fromarray(np.asarray(self.mask, dtype=np.float32), mode="F")
            scale = full.width / side  # a mask may be stored at another size than the image
            mask_box = tuple(v * scale for v in box)
            mask = np.asarray(full.resize(full.size, Image.Resampling.BILINEAR, box=mask_box), dtype=np.float32)
            mask = np.clip(mask, 0.0, 1.0)
        if flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
            mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
        return TrainingPhoto(image=image, mask=mask)

    @classmethod
    def center_crop(cls, image: Image.Image) -> TrainingPhoto:
        """Fallback without face preparation: the largest centred square, no mask."""
        image = ImageOps.exif_transpose(image).convert("RGB")
        side = min(image.size)
        return cls(image=ImageOps.fit(image, (side, side)), mask=None)


def _float_mask(mask: Any) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    mask = np.asarray(mask, dtype=np.float32)
    if mask.max(initial=0.0) > 1.0:  # 0..255 masks
        mask = mask / 255.0
    return np.clip(mask, 0.0, 1.0)


class PreviewSampler(Protocol):
    """What the trainer needs from ``studio.sampler.Sampler`` to render previews."""

    def __call__(self, concept: Concept, prompts: list[str], **kwargs: Any) -> Any: ...


@dataclass
class _MicroStep:
    """Losses of one micro-batch: ``loss`` keeps the graph, the rest are for logging."""

    loss: torch.Tensor
    rec_loss: torch.Tensor
    te_loss: torch.Tensor
    cgdr_loss: torch.Tensor
    balance: torch.Tensor


@dataclass
class _Snapshot:
    """Last known-good mapper + optimiser state, for NaN rollback."""

    step: int
    mapper: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None


class TrainingInputError(StudioError, ValueError):
    """A training input (photos, a live preview setting) is not usable."""


class StateMismatch(StudioError, ValueError):
    """A saved trainer state belongs to other photos, another base model or other settings."""


def run_identity(backbone: Backbone, cfg: StudioConfig, photos: Sequence[TrainingPhoto]) -> dict[str, Any]:
    """What a saved trainer state is only valid with, flat: a digest of the photos and masks,
    the base model, and every concept and training setting except steps and preview cadence."""
    digest = hashlib.sha256()
    for photo in photos:
        digest.update(f"{photo.image.size}".encode())
        digest.update(photo.image.tobytes())
        digest.update(b"no mask" if photo.mask is None else np.ascontiguousarray(photo.mask, np.float32).tobytes())
    identity: dict[str, Any] = {"photos": f"{len(photos)} photo(s), sha256 {digest.hexdigest()[:16]}"}
    identity.update({f"model.{key}": value for key, value in backbone.fingerprint().items()})
    for section in ("concept", "train"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if section == "concept" or key not in _RESUMABLE_CHANGES:
                identity[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return identity


def _setting_defaults() -> dict[str, Any]:
    """Every concept and training setting's default, keyed as :func:`run_identity` keys them."""
    from studio.config import ConceptConfig, TrainConfig

    defaults: dict[str, Any] = {}
    for section, kind in (("concept", ConceptConfig), ("train", TrainConfig)):
        for key, value in dataclasses.asdict(kind()).items():
            defaults[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    return defaults


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise :class:`StateMismatch` naming what differs between two :func:`run_identity`."""
    if saved is None:
        raise StateMismatch("the saved training state does not say which photos and settings it belongs to")
    # A setting newer than the saved state was, in effect, at its default there.
    saved = {**{key: value for key, value in _setting_defaults().items() if key in current}, **saved}
    differences = [
        f"{key} was {saved.get(key, 'unset')!r}, now {current.get(key, 'unset')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        what = "other photos" if any(d.startswith("photos ") for d in differences) else "other settings"
        raise StateMismatch(
            f"the saved training state was made with {what}; it resumes only the same run: " + "; ".join(differences)
        )


def _clone_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Train a mapper (:mod:`studio.mapper`) on photos of one person with a frozen backbone.

    Attributes: ``step`` (optimiser steps done), ``total`` (``cfg.train.steps``), ``mapper``,
    ``last_balance`` (ā of the TE term in the last step), ``preview_band`` / ``preview_balance``
    (live preview settings; the engine sets them from the UI sliders).
    """

    def __init__(
        self,
        backbone: Backbone,
        cfg: StudioConfig,
        photos: Sequence[TrainingPhoto],
        *,
        sampler: PreviewSampler | None = None,
    ) -> None:
        self.backbone, self.cfg, self.sampler = backbone, cfg, sampler
        check_prediction_type(backbone.noise_scheduler.config)
        self._init_photos(photos)
        self._init_tokens()
        self._init_randomness()
        self._init_mapper()
        self._init_optimizer()
        self._init_precision()
        self._init_latents()
        self._init_image_embedding()
        self._init_prompts()
        self._init_bookkeeping()

    # ------------------------------------------------------------------ setup
    def _init_photos(self, photos: Sequence[TrainingPhoto]) -> None:
        if not photos:
            raise TrainingInputError("No photos to train on: add at least one photo of the person.")
        self.photos = tuple(photos)

    def _init_tokens(self) -> None:
        tokenizer = self.backbone.tokenizer
        concept = self.cfg.concept
        # The textual-inversion baseline learns one static token.
        self.num_tokens = 1 if concept.is_ti else concept.num_tokens
        self.super_category = concept.super_category.strip()
        self.slot_id = super_category_id(tokenizer, self.super_category)  # PromptError if not one token
        self.class_embedding = self.backbone.text_encoder.get_input_embeddings().weight[self.slot_id].detach().float()

    def _init_randomness(self) -> None:
        """Every random draw of training comes from these two streams, seeded by ``train.seed``."""
        seed = self.cfg.train.seed
        self.generator = torch.Generator(device=self.backbone.device).manual_seed(seed)
        self.rng = random.Random(seed)

    def _init_mapper(self) -> None:
        concept = self.cfg.concept
        has_image_encoder = self.backbone.image_encoder is not None
        self.use_bypass = concept.use_bypass and has_image_encoder and not concept.is_ti
        self.band = self.cfg.training_band  # 0..999 without stage regulation
        # The same train.seed gives the same start; layers are built on the CPU, then moved.
        with seeded_init(self.cfg.train.seed):
            self.mapper = build_mapper(
                self.class_embedding,
                method=concept.method,
                band=self.band,
                num_tokens=self.num_tokens,
                num_anchors=concept.num_anchors,
                hidden_dim=concept.hidden_dim,
                time_encoding_dim=concept.time_encoding_dim,
                image_embed_dim=self.backbone.image_embed_dim if self.use_bypass else None,
                bypass_input=concept.bypass_input,
                head_init=concept.head_init,
            )
        self.mapper.to(self.backbone.device, torch.float32).train()

    def _init_optimizer(self) -> None:
        train = self.cfg.train
        self.optimizer = torch.optim.AdamW(
            self.mapper.parameters(),
            lr=train.lr,
            betas=tuple(train.betas),
            weight_decay=train.weight_decay,
            fused=self.backbone.device.type == "cuda",
        )

    def _init_precision(self) -> None:
        """Autocast dtype on CUDA only: on CPUs without AMX, bf16/fp16 convolutions fall back to
        reference kernels (one 3×3 conv measured 360× slower than fp32 on a Zen 3 CPU)."""
        choice = self.cfg.train.mixed_precision
        self.autocast_dtype: torch.dtype | None = None
        if self.backbone.device.type == "cuda" and choice != "no":
            if choice == "auto":
                choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            self.autocast_dtype = torch.bfloat16 if choice == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.backbone.device.type, dtype=self.autocast_dtype)

    def _views(self) -> tuple[TrainingPhoto, ...]:
        """The photos as trained on: each photo itself, plus ``train.views - 1`` random zoom-in views
        of it when ``train.crop_jitter`` or ``train.flip`` is on (drawn from their own stream, so
        the others' draws stay those of a run without views)."""
        train = self.cfg.train
        if train.views <= 1 or (train.crop_jitter == 0 and not train.flip):
            return self.photos
        rng = random.Random(f"views {train.seed}")
        views = []
        for photo in self.photos:
            views.append(photo)
            views += [photo.jittered(rng, train.crop_jitter, train.flip) for _ in range(train.views - 1)]
        return tuple(views)

    def _init_latents(self) -> None:
        """VAE latents (V, 4, h, w) and latent-size face masks (V, 1, h, w) of the views of the
        photos (:meth:`_views`; V = N without them), once.

        ``rec_weights`` weigh the reconstruction loss: the face masks, or ones for the
        textual-inversion baseline (plain MSE)."""
        views = self._views()
        self.latents = self._encode_latents(views)
        side = self.latents.shape[-1]
        masks = []
        for photo in views:
            if photo.mask is None:
                masks.append(torch.ones(1, 1, side, side))
            else:
                full = torch.from_numpy(np.asarray(photo.mask, dtype=np.float32))[None, None]
                masks.append(F.interpolate(full, size=(side, side), mode="area"))  # soft edges survive
        self.masks = torch.cat(masks).to(self.backbone.device)
        self.rec_weights = torch.ones_like(self.masks) if self.cfg.concept.is_ti else self.masks

    @torch.no_grad()
    def _encode_latents(self, photos: Sequence[TrainingPhoto]) -> torch.Tensor:
        """(N, 4, h, w) z0 = posterior mean · scaling_factor (tests override this to bring latents).

        The mean, not a sample: the latent is computed once, and a single frozen posterior
        sample would add a fixed noise pattern to every step instead of averaging it out.
        """
        vae, size = self.backbone.vae, self.cfg.train.resolution
        processor = VaeImageProcessor(vae_scale_factor=self.backbone.vae_scale_factor)
        latents = []
        for photo in photos:
            pixels = processor.preprocess(photo.image.convert("RGB"), height=size, width=size)  # (1, 3, H, W) in [-1, 1]
            posterior = vae.encode(pixels.to(self.backbone.device, vae.dtype)).latent_dist
            latents.append(posterior.mean.float() * vae.config.scaling_factor)
        return torch.cat(latents)

    @torch.no_grad()
    def _init_image_embedding(self) -> None:
        """(E,) mean CLIP image embedding of the photos for the bypass; None without bypass."""
        self.image_embedding: torch.Tensor | None = None
        if not self.use_bypass:
            return
        encoder, processor = self.backbone.image_encoder, self.backbone.image_processor
        pixels = processor(images=[p.image.convert("RGB") for p in self.photos], return_tensors="pt").pixel_values
        embeds = encoder(pixel_values=pixels.to(self.backbone.device, encoder.dtype)).image_embeds
        self.image_embedding = embeds.float().mean(dim=0)

    def _init_prompts(self) -> None:
        """Tokenise every template once; each step indexes rows."""
        tokenizer, device, k = self.backbone.tokenizer, self.backbone.device, self.num_tokens
        train = self.cfg.train
        reconstruction = list(train.reconstruction_prompts or RECONSTRUCTION_TEMPLATES)
        tandem = list(train.tandem_prompts or TANDEM_PROMPTS)
        ids, mask = tokenize(tokenizer, reconstruction, k, self.slot_id)
        self.rec_ids, self.rec_mask = ids.to(device), mask.to(device)
        # The same templates with the super-category word for {}: the class prompts of CGDR.
        self.class_ids = tokenize(tokenizer, reconstruction, 0, self.slot_id)[0].to(device)
        ids, mask = tokenize(tokenizer, tandem, k, self.slot_id)
        self.te_ids, self.te_mask = ids.to(device), mask.to(device)
        self.te_lengths = prompt_lengths(self.te_ids, tokenizer.eos_token_id)
        self.tandem = TandemEquilibriumLoss(balance_target=train.te_balance, temperature=train.te_temperature)

    def _init_bookkeeping(self) -> None:
        self.step = 0
        self.last_balance: float | None = None
        self._preview_band = check_band(self.cfg.sample.band, "preview band")
        self._preview_balance = float(self.cfg.sample.balance)
        self._last_preview_step: int | None = None
        self._rollbacks_in_row = 0
        self._weights_version = 0  # bumped whenever the mapper's weights change
        self._concept_cache: tuple[int, Concept] | None = None
        self._take_snapshot()

    # ------------------------------------------------------------------ properties
    @property
    def total(self) -> int:
        return self.cfg.train.steps

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def preview_band(self) -> tuple[int, int]:
        return self._preview_band

    @preview_band.setter
    def preview_band(self, band: tuple[int, int]) -> None:
        self._preview_band = check_band(band, "preview band")

    @property
    def preview_balance(self) -> float:
        return self._preview_balance

    @preview_balance.setter
    def preview_balance(self, balance: float) -> None:
        if not balance > 0:
            raise TrainingInputError(f"The tandem balance must be above 0, got {balance}.")
        self._preview_balance = float(balance)

    # ------------------------------------------------------------------ loop
    def run(self, until: int | None = None) -> Iterator[TrainingEvent]:
        """Train up to step ``until`` (default: ``total``), yielding events as they happen.

        Yields a PreviewReady for the current step if one is due and not yet shown, then per
        step a TrainingStep (or RolledBack) and any due PreviewReady, and TrainingFinished once
        ``step == total``. Failures (out of memory, repeated NaN) end the run with a
        TrainingFailed; the trainer stays usable.
        """
        stop = self.total if until is None else min(until, self.total)
        rollbacks = 0  # in this run
        if not (yield from self._preview_if_due()):
            return
        while self.step < stop:
            outcome = yield from self._guarded(self.train_step)
            if isinstance(outcome, TrainingFailed):
                return
            rollbacks += isinstance(outcome, RolledBack)
            if rollbacks >= MAX_ROLLBACKS_PER_RUN and self._rollbacks_in_row < MAX_ROLLBACKS_IN_ROW:
                yield TrainingFailed(
                    step=self.step,
                    message=(
                        f"Training stopped: the loss stopped being a finite number {rollbacks} times in this run "
                        f"(going back to step {outcome.restored_step} each time did not help). {self._divergence_advice()}"
                    ),
                )
                return
            if isinstance(outcome, RolledBack) and self._rollbacks_in_row >= MAX_ROLLBACKS_IN_ROW:
                yield TrainingFailed(
                    step=self.step,
                    message=(
                        f"The loss was not a finite number {self._rollbacks_in_row} times in a row, even after going "
                        f"back to step {outcome.restored_step}. {self._divergence_advice()}"
                    ),
                )
                return
            if not (yield from self._preview_if_due()):
                return
        if self.done:
            # a last look at the result when training ended between two preview steps
            if not (yield from self._preview_if_due(final=True)):
                return
            yield TrainingFinished(step=self.step, total=self.total, concept=self.concept())

    def _divergence_advice(self) -> str:
        """What to change after repeated non-finite losses: the TE weight when it is far above its
        usual range (1e-3), else the learning rate."""
        train = self.cfg.train
        if train.te_weight > TE_WEIGHT_SUSPECT:
            return (f"The TE weight is far above its usual 0.001 (now {train.te_weight:g}): lower it "
                    f"and train again.")
        return f"The learning rate is too high: lower it (now {train.lr:g}) and train again."

    def _guarded(self, action: Callable[[], TrainingEvent]) -> Generator[TrainingEvent, None, TrainingEvent]:
        """Yield and return ``action()``'s event; out of memory becomes a TrainingFailed event."""
        try:
            event = action()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._free_memory()
            event = TrainingFailed(step=self.step, kind="oom", message=OUT_OF_MEMORY_MESSAGE)
        yield event
        return event

    def _free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _preview_if_due(self, final: bool = False) -> Generator[TrainingEvent, None, bool]:
        """Yield a preview when one is due (every ``preview_every`` steps, or at the end with
        ``final``) and not shown yet for this step; False when rendering it failed."""
        every = self.cfg.train.preview_every
        due = every > 0 and (final or self.step % every == 0) and self._last_preview_step != self.step
        if not due:
            return True
        return not isinstance((yield from self._guarded(self.preview)), TrainingFailed)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> TrainingStep | RolledBack:
        """One optimiser step of ``grad_accum`` micro-batches; rolls back on a non-finite value."""
        started = time.perf_counter()
        train = self.cfg.train
        for _ in range(MAX_SCALER_SKIPS):
            self.optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "rec_loss": 0.0, "te_loss": 0.0, "cgdr_loss": 0.0, "balance": 0.0}
            for _ in range(train.grad_accum):
                micro = self._micro_step()
                # One device-to-host copy per micro-step: the logged values, loss first.
                logged = torch.stack(
                    [micro.loss.detach(), micro.rec_loss, micro.te_loss, micro.cgdr_loss, micro.balance]
                ).tolist()
                if not math.isfinite(logged[0]):
                    return self._roll_back("the loss was not a finite number")
                loss = micro.loss / train.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                for key, value in zip(totals, logged):
                    totals[key] += value / train.grad_accum
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            max_norm = train.max_grad_norm if train.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.mapper.parameters(), max_norm)
            if torch.isfinite(grad_norm):
                break
            if not self.scaler:
                return self._roll_back("the gradients were not finite numbers")
            # fp16: the scaler skips this update and lowers its scale; try the step again.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            return self._roll_back("the fp16 gradients kept overflowing")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._weights_version += 1
        self._rollbacks_in_row = 0
        self.last_balance = totals["balance"]
        if self.step % train.snapshot_every == 0:
            self._take_snapshot()
        return TrainingStep(
            step=self.step,
            total=self.total,
            loss=totals["loss"],
            rec_loss=totals["rec_loss"],
            te_loss=totals["te_loss"],
            cgdr_loss=totals["cgdr_loss"],
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            attention_balance=totals["balance"],
        )

    def _micro_step(self) -> _MicroStep:
        """Forward one micro-batch of ``batch_size`` samples:
        L = L_rec + λ_TE·L_TE + λ_CGDR·L_CGDR (docs/ALGORITHM.md, "Losses")."""
        backbone, train, device = self.backbone, self.cfg.train, self.backbone.device
        batch = train.batch_size
        # 1. Sample photos and prompts (python RNG), timesteps, noise and bypass dropout (torch).
        photo_idx = torch.tensor([self.rng.randrange(len(self.latents)) for _ in range(batch)], device=device)
        rec_idx = torch.tensor([self.rng.randrange(len(self.rec_ids)) for _ in range(batch)], device=device)
        te_idx = torch.tensor([self.rng.randrange(len(self.te_ids)) for _ in range(batch)], device=device)
        lo, hi = self.band
        timesteps = torch.randint(lo, hi, (batch,), generator=self.generator, device=device)
        latents, masks = self.latents[photo_idx], self.masks[photo_idx]
        noise = torch.randn(latents.shape, generator=self.generator, device=device, dtype=latents.dtype)
        noisy = backbone.noise_scheduler.add_noise(latents, noise, timesteps)

        # 2. The mapper runs outside autocast: it is tiny, and its fp32 output keeps the
        #    renormalised token vectors exact.
        identity = self.mapper(timesteps)  # (B, K, D)
        bypass = None
        if self.use_bypass:
            vectors = self.mapper.bypass_vectors(timesteps, self.image_embedding)
            keep = torch.rand(batch, generator=self.generator, device=device) >= self.cfg.concept.bypass_dropout
            vectors = vectors * keep[:, None, None].to(vectors.dtype)
            # TE rows never reach the UNet: their bypass is zero.
            bypass = torch.cat([vectors, torch.zeros_like(vectors)])
        with self._autocast():
            # 3. One text-encoder pass over [reconstruction rows ; TE rows], same t for both halves.
            ids = torch.cat([self.rec_ids[rec_idx], self.te_ids[te_idx]])
            identity_mask = torch.cat([self.rec_mask[rec_idx], self.te_mask[te_idx]])
            states = encode_text(
                backbone,
                ids,
                identity_mask,
                identity=torch.cat([identity, identity]),
                bypass=bypass,
                capture_attention=True,
            )
            # 4. Denoise the reconstruction rows; values from the bypassed states when on.
            kwargs = {"value_states": states.values[:batch]} if states.values is not None else None
            pred = backbone.unet(
                noisy.to(backbone.unet.dtype),
                timesteps,
                encoder_hidden_states=states.hidden[:batch],
                cross_attention_kwargs=kwargs,
            ).sample
            # 5. CGDR: the frozen model's prediction for the class prompt, without gradient.
            class_pred = self._class_prediction(noisy, timesteps, rec_idx) if train.cgdr_weight > 0 else None
        if backbone.noise_scheduler.config.prediction_type == "v_prediction":
            target = backbone.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        rec_loss = masked_mse(pred, target, self.rec_weights[photo_idx])
        loss = rec_loss
        # 6. Tandem Equilibrium on the TE rows' last-layer self-attention (logged for TI too, never trained).
        tandem = self.tandem(states.attention[batch:], self.te_mask[te_idx], self.te_lengths[te_idx])
        if train.te_weight > 0 and not self.cfg.concept.is_ti:
            loss = loss + train.te_weight * tandem.loss
        # 7. Outside the face, the prediction should match the class prompt's (Face2Diffusion).
        cgdr_loss = torch.zeros((), device=device)
        if class_pred is not None:
            cgdr_loss = masked_mse(pred, class_pred, 1.0 - masks)
            loss = loss + train.cgdr_weight * cgdr_loss
        return _MicroStep(
            loss=loss, rec_loss=rec_loss.detach(), te_loss=tandem.loss.detach(), cgdr_loss=cgdr_loss.detach(),
            balance=tandem.balance.detach().mean(),
        )

    @torch.no_grad()
    def _class_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, rec_idx: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) sg[ε̂(z_t, t, c_class)]: the same templates with the super-category word
        in place of the identity tokens; one extra UNet pass, no graph."""
        backbone = self.backbone
        class_states = encode_text(backbone, self.class_ids[rec_idx])
        return backbone.unet(
            noisy.to(backbone.unet.dtype), timesteps, encoder_hidden_states=class_states.hidden
        ).sample.float()

    # ------------------------------------------------------------------ rollback
    def _take_snapshot(self) -> None:
        self._snapshot = _Snapshot(
            step=self.step,
            mapper=_clone_tensors(self.mapper.state_dict()),
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            scaler=copy.deepcopy(self.scaler.state_dict()) if self.scaler else None,
        )

    def _roll_back(self, reason: str) -> RolledBack:
        """Restore the last good snapshot; the random streams go on, so the next draw differs."""
        failed_step = self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        snapshot = self._snapshot
        self.mapper.load_state_dict(snapshot.mapper)
        self.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        if self.scaler and snapshot.scaler:
            self.scaler.load_state_dict(snapshot.scaler)
        self.step = snapshot.step
        self._weights_version += 1
        self._rollbacks_in_row += 1
        return RolledBack(step=failed_step, restored_step=snapshot.step, reason=reason)

    # ------------------------------------------------------------------ outputs
    def concept(self) -> Concept:
        """An immutable snapshot of the current weights (same object until the weights change)."""
        if self._concept_cache is not None and self._concept_cache[0] == self._weights_version:
            return self._concept_cache[1]
        mapper = copy.deepcopy(self.mapper).eval().requires_grad_(False)
        concept = Concept(
            mapper=mapper,
            super_category=self.super_category,
            train_band=self.band,
            late_stage=self.cfg.concept.late_stage,
            backbone=self.backbone.fingerprint(),
            image_embedding=None if self.image_embedding is None else self.image_embedding.detach().clone(),
            steps_done=self.step,
            config=self.cfg.to_dict(),
            stage_regulation=self.cfg.concept.stage_regulated,
        )
        self._concept_cache = (self._weights_version, concept)
        return concept

    def preview(self) -> PreviewReady:
        """Render the preview prompts with the current weights and the live band / balance."""
        from studio.sampler import render_preview  # only when previews are wanted

        event = render_preview(self._preview_sampler(), self.concept(), self.cfg, self.preview_band, self.preview_balance)
        self._last_preview_step = self.step
        return event

    def _preview_sampler(self) -> PreviewSampler:
        if self.sampler is None:
            from studio.sampler import Sampler  # only when previews are wanted

            self.sampler = Sampler(self.backbone)
        return self.sampler

    # ------------------------------------------------------------------ state
    def run_identity(self) -> dict[str, Any]:
        """See :func:`run_identity`."""
        return run_identity(self.backbone, self.cfg, self.photos)

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: mapper, optimiser, scaler, both RNG streams, step,
        and the :meth:`run_identity` it is valid for."""
        return {
            "format": STATE_FORMAT,
            "run": self.run_identity(),
            "step": self.step,
            "mapper": _clone_tensors(self.mapper.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()) if self.scaler else None,
            "generator": self.generator.get_state(),
            "python_random": self.rng.getstate(),
            "last_preview_step": self._last_preview_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` (from :meth:`state_dict`) left off."""
        if state.get("format") != STATE_FORMAT:
            raise StateMismatch(f"the saved training state has an unknown format {state.get('format')!r}")
        check_same_run(state.get("run"), self.run_identity())
        self.mapper.load_state_dict(state["mapper"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.rng.setstate(state["python_random"])
        self.step = int(state["step"])
        self._last_preview_step = state.get("last_preview_step")
        self._weights_version += 1
        self._rollbacks_in_row = 0
        self._take_snapshot()
