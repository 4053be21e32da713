"""Stage-regulated generation with a learned concept (docs/ALGORITHM.md, "Stages" and "Generation"), shaped like a diffusers pipeline.

Each denoising step ``t`` gets its text condition from the stage table: early steps (t above
the band) see the prompt with the super-category word, steps inside the band the identity
tokens ``mapper(t)`` (+ image bypass), late steps ``mapper(band start)`` or the
super-category word. All conditions a call needs are encoded in ONE batched text-encoder
pass and cached, so moving the seed or the band slider re-runs only the UNet.
"""
from __future__ import annotations

import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from studio import lora
from studio.backbone import Backbone
from studio.concept import Concept
from studio.conditioning import (
    PromptError,
    Stage,
    StageSchedule,
    check_prompt,
    encode_text,
    super_category_id,
    tokenize,
)
from studio.attention import balance_bias
from studio.config import BALANCE_TARGETS, DEFAULT_NEGATIVE_PROMPT, NUM_TRAIN_TIMESTEPS, SampleConfig, StudioConfig, check_band
from studio.errors import StudioError
from studio.events import PreviewReady

# The word that stands in for {} when there is no concept (plain Stable Diffusion baseline).
DEFAULT_SUPER_CATEGORY = "face"

# name -> build a fresh scheduler from the backbone's training noise-schedule config. A new
# instance per call: diffusers schedulers keep per-run state (step index, solver history).
SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "dpmsolver++ karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", use_karras_sigmas=True
    ),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "euler ancestral": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config),
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
    "ddpm": lambda config: DDPMScheduler.from_config(config),
}

MAX_SEED = 2**63 - 1
_SHARED: dict[int, Sampler] = {}
_SHARED_LOCK = threading.Lock()
# Generated images are at most this many times the model's native side (tiny: 64 px; SD 1.5: 512).
MAX_SIDE_FACTOR = 4


class SamplerInputError(StudioError, ValueError):
    """A generation setting is invalid; the message says what is allowed."""


class GenerationInterrupted(Exception):
    """``callback_on_step_end`` asked to stop; no images are returned for an unfinished run.

    step: denoising steps completed; total: steps planned.
    """

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"Generation stopped after {step} of {total} steps.")
        self.step, self.total = step, total


@dataclass(frozen=True)
class GenerationResult:
    """Images in prompt-major order (all seeds of prompt 0, then prompt 1, ...), one caption
    and one settings dict per image (enough to reproduce it)."""

    images: list[Image.Image]
    captions: list[str]
    settings: list[dict]


@dataclass(frozen=True)
class PlannedStep:
    """What one denoising step gets: its timestep, stage and the mapper's input (None = the word)."""

    timestep: int
    stage: Stage
    mapper_timestep: int | None


def stage_plan(
    backbone: Backbone, scheduler: str, num_inference_steps: int, band: tuple[int, int], late_stage: str = "band_edge"
) -> list[PlannedStep]:
    """The stage of every denoising step of ``scheduler`` for ``band`` (e.g. to show
    "identity in 8 of 20 steps" next to the band slider)."""
    if scheduler not in SCHEDULERS:
        raise SamplerInputError(f"Unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
    noise_scheduler = SCHEDULERS[scheduler](backbone.noise_scheduler.config)
    noise_scheduler.set_timesteps(num_inference_steps)
    return _plan(noise_scheduler.timesteps, check_band(band, "band (timestep interval)"), late_stage)


def _plan(timesteps: Sequence[Any], band: tuple[int, int], late_stage: str) -> list[PlannedStep]:
    """Stage and mapper timestep of each denoising timestep: what stage_plan shows and __call__ runs."""
    schedule = StageSchedule(band, late_stage)
    return [PlannedStep(int(t), schedule.stage(int(t)), schedule.mapper_timestep(int(t))) for t in timesteps]


@dataclass(frozen=True)
class _EncodedRow:
    """One cached text condition: hidden (L, D) for keys (and values), values (L, D) bypassed, or
    None; identity (L,) bool at the identity tokens' positions, or None for a plain-text row."""

    hidden: torch.Tensor
    values: torch.Tensor | None = None
    identity: torch.Tensor | None = None

    @property
    def value_states(self) -> torch.Tensor:
        return self.hidden if self.values is None else self.values

    @property
    def identity_positions(self) -> torch.Tensor:
        """(L,) bool: ``identity``, all False for a plain-text row."""
        return self.identity if self.identity is not None else torch.zeros(len(self.hidden), dtype=torch.bool, device=self.hidden.device)


@dataclass(frozen=True)
class _Request:
    """A text condition a call needs: cache ``group`` (LRU unit) and ``entry`` inside it.

    mapper_t is None for a plain-text row (negative or super-category prompt).
    """

    group: tuple
    entry: Any
    prompt: str
    mapper_t: int | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """Everything about a generation but the concept and the prompts (Sampler.__call__'s keywords).

    band: (start, end) on the 0..999 scale: denoising steps with start <= t <= end get mapper(t);
        later steps get mapper(start) or the word (``concept.late_stage``).
    guidance_scale: classifier-free guidance; <= 1 runs without the negative branch (diffusers' rule).
    balance: tandem balance gamma (1 = neutral); ``balance_target`` says where it acts: the text
        encoder's last ``balance_layers`` layers, or the UNet's cross-attention.
    seeds: one image per seed and prompt; latents come from a CPU generator, so a seed gives the
        same image on every device.
    height, width: None = the backbone's native resolution.
    """

    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    num_inference_steps: int = 20
    guidance_scale: float = 8.0
    band: tuple[int, int] = (400, 800)
    balance: float = 1.0
    balance_layers: int = 1
    balance_target: str = "unet"
    seeds: int | list[int] = 0
    height: int | None = None
    width: int | None = None
    scheduler: str = "dpmsolver++"

    @classmethod
    def from_config(cls, cfg: StudioConfig | SampleConfig, *, preview: bool = False, **overrides: Any) -> GenerationSettings:
        """The preset's generation settings, with ``overrides`` (field names; None keeps the preset's).

        ``cfg``: a StudioConfig (size: ``cfg.image_size``) or its ``sample`` section (size:
        ``sample.resolution``, 0 = the backbone's native size). ``preview``: the live previews'
        step count and seeds instead of generation's.
        """
        sample = cfg.sample if isinstance(cfg, StudioConfig) else cfg
        side = cfg.image_size if isinstance(cfg, StudioConfig) else (sample.resolution or None)
        settings = cls(
            negative_prompt=sample.negative_prompt,
            num_inference_steps=sample.preview_steps if preview else sample.steps,
            guidance_scale=sample.guidance_scale, band=tuple(sample.band), balance=sample.balance,
            balance_layers=sample.balance_layers, balance_target=sample.balance_target, seeds=list(sample.preview_seeds) if preview else 0,
            height=side, width=side, scheduler=sample.scheduler,
        )
        return replace(settings, **{key: value for key, value in overrides.items() if value is not None})

    @property
    def text_balance(self) -> float:
        """The gamma the text encoder applies (1 when it acts in the UNet)."""
        return self.balance if self.balance_target == "text_encoder" else 1.0

    @property
    def unet_balance(self) -> float:
        """The gamma on the UNet's identity keys (1 when it acts in the text encoder)."""
        return self.balance if self.balance_target == "unet" else 1.0

    def kwargs(self) -> dict[str, Any]:
        """The settings as ``Sampler.__call__`` keywords."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


class Sampler:
    """Generate images of a :class:`Concept` (or plain SD when ``concept`` is None).

    One sampler per backbone is meant to be shared by all sessions: the text-condition cache
    is guarded by a lock, and everything else lives in the call. ``text_encoder_calls`` counts
    text-encoder passes (one per call at most), so tests and benchmarks can see cache hits.
    """

    def __init__(self, backbone: Backbone, cache_size: int = 64) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.backbone = backbone
        self.cache_size = cache_size
        self.text_encoder_calls = 0
        # group key -> {entry key -> _EncodedRow}; groups are (prompt, concept, balance) units.
        self._cache: OrderedDict[tuple, dict[Any, _EncodedRow]] = OrderedDict()
        self._lock = threading.Lock()
        self._image_processor = VaeImageProcessor(vae_scale_factor=backbone.vae_scale_factor)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, concept: Concept | None, prompts: str | list[str], **settings: Any) -> tuple[list[str], GenerationSettings]:
        """Fail early with a sentence the user can act on. ``settings``: the fields of
        :class:`GenerationSettings`. Returns the prompts and the settings, normalised (a seed
        list, a band tuple, the backbone's native size where none was given)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PromptError("No prompt given. Describe the picture, with {} for the person, e.g. 'a photo of {} as a chef'.")
        prompts = [check_prompt(p, require_identity=concept is not None) for p in prompts]
        given = GenerationSettings(**settings)
        if not isinstance(given.negative_prompt, str):
            raise PromptError("The negative prompt must be text (it may be empty).")
        tokenizer = self.backbone.tokenizer
        negative_length = len(tokenizer(given.negative_prompt, add_special_tokens=False, verbose=False).input_ids) + 2
        if negative_length > tokenizer.model_max_length:
            raise PromptError(
                f"The negative prompt is too long: {negative_length} tokens, the text encoder reads "
                f"{tokenizer.model_max_length}. Shorten it."
            )
        if concept is not None:
            if concept.mapper.token_dim != self.backbone.token_dim:
                raise SamplerInputError(
                    f"This concept makes tokens of width {concept.mapper.token_dim}, but the loaded model "
                    f"({self.backbone.describe()}) reads width {self.backbone.token_dim}: it was trained on another model."
                )
            super_category_id(self.backbone.tokenizer, concept.super_category)
        steps = given.num_inference_steps
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise SamplerInputError(f"The number of steps must be a whole number from 1 to 1000, got {steps!r}.")
        if not math.isfinite(given.guidance_scale) or given.guidance_scale < 0:
            raise SamplerInputError(f"The guidance scale must be a number >= 0, got {given.guidance_scale!r}.")
        band = check_band(given.band, "band (timestep interval)")
        if not math.isfinite(given.balance) or given.balance <= 0:
            raise SamplerInputError(
                f"The tandem balance must be > 0 (1 = neutral, < 1 favours the prompt, > 1 the identity), got {given.balance!r}."
            )
        num_layers = self.backbone.num_text_layers
        if not 1 <= given.balance_layers <= num_layers:
            raise SamplerInputError(
                f"balance_layers must be between 1 and {num_layers} (the text encoder's layers), got {given.balance_layers}."
            )
        if given.balance_target not in BALANCE_TARGETS:
            raise SamplerInputError(
                f"The tandem balance acts in one of: {', '.join(BALANCE_TARGETS)}; got {given.balance_target!r}."
            )
        if given.scheduler not in SCHEDULERS:
            raise SamplerInputError(f"Unknown scheduler {given.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
        seeds = [given.seeds] if isinstance(given.seeds, int) else list(given.seeds)
        if not seeds:
            raise SamplerInputError("Give at least one seed.")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise SamplerInputError(f"Seeds must be whole numbers from 0 to {MAX_SEED}, got {seed!r}.")
        native = self.backbone.native_resolution
        multiple = self.backbone.size_multiple
        height = native if given.height is None else given.height
        width = native if given.width is None else given.width
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or side < multiple or side % multiple:
                raise SamplerInputError(
                    f"The image {name} must be a positive multiple of {multiple} pixels for this model, got {side!r} "
                    f"(its native size is {native})."
                )
            if side > MAX_SIDE_FACTOR * native:
                raise SamplerInputError(
                    f"The image {name} can be at most {MAX_SIDE_FACTOR * native} pixels for this model, got {side} "
                    f"(its native size is {native}; larger images need more memory than a shared server has)."
                )
        return prompts, replace(given, seeds=seeds, band=band, height=height, width=width)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def __call__(
        self,
        concept: Concept | None,
        prompts: str | list[str],
        *,
        callback_on_step_end: Callable[[int, int], bool | None] | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """One image per (prompt, seed), prompt-major, denoised together in one UNet batch.

        Args:
            concept: the identity; None = plain SD with the super-category word for ``{}``.
            prompts: text with ``{}`` where the person goes.
            settings: the fields of :class:`GenerationSettings` (steps, guidance, band, balance, seeds, ...).
            callback_on_step_end: called as ``(steps_done, total)`` after each step; returning
                True stops the run by raising :class:`GenerationInterrupted`.
        """
        prompts, checked = self.check_inputs(concept, prompts, **settings)
        negative_prompt, num_inference_steps, guidance_scale = (
            checked.negative_prompt, checked.num_inference_steps, checked.guidance_scale,
        )
        band, balance, balance_layers, seeds = checked.band, checked.balance, checked.balance_layers, checked.seeds
        height, width, scheduler = checked.height, checked.width, checked.scheduler
        backbone = self.backbone
        device, dtype = backbone.device, backbone.dtype
        do_cfg = guidance_scale > 1.0

        # 1. Timesteps of the chosen scheduler (fresh instance: schedulers are stateful).
        noise_scheduler = SCHEDULERS[scheduler](backbone.noise_scheduler.config)
        noise_scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = noise_scheduler.timesteps
        total = len(timesteps)

        # 2. Which text condition each step gets (stage table), then all of them at once. A
        #    concept trained without stage regulation (or the TI baseline) is used at every step.
        late_stage = concept.late_stage if concept is not None else "super_category"
        if concept is not None and not concept.stage_regulation:
            band = (0, NUM_TRAIN_TIMESTEPS)
        mapper_ts = [step.mapper_timestep if concept is not None else None for step in _plan(timesteps, band, late_stage)]
        # gamma acts either inside the text encoder (cached with the rows) or on the UNet's keys
        rows = self._text_conditions(concept, prompts, negative_prompt if do_cfg else None, mapper_ts,
                                     checked.text_balance, balance_layers)

        # 3. Initial latents: one CPU generator per image, so a (prompt, seed) pair gives the
        # same noise whatever else is in the batch and on whatever device.
        images_prompt = [p for p in range(len(prompts)) for _ in seeds]
        images_seed = [s for _ in prompts for s in seeds]
        generators = [torch.Generator("cpu").manual_seed(s) for s in images_seed]
        latent_shape = (1, backbone.unet.config.in_channels, height // backbone.vae_scale_factor, width // backbone.vae_scale_factor)
        latents = torch.cat([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
        latents = latents.to(device=device, dtype=dtype) * noise_scheduler.init_noise_sigma
        num_images = len(images_seed)
        # Stochastic schedulers draw their noise from the same per-image generators (PNDM and
        # UniPC take no generator argument).
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(noise_scheduler.step).parameters else {}

        # 4. Batch text conditions [negatives ; conditions], built once per distinct mapper
        #    timestep (a step only changes them when it enters another stage or band time).
        batch_conditions: dict[int | None, tuple[torch.Tensor, dict | None]] = {}
        for mapper_t in set(mapper_ts):
            cond = [rows[(p, mapper_t)] for p in images_prompt]
            if do_cfg:
                cond = [rows["negative"]] * num_images + cond
            kwargs = {}
            if any(row.values is not None for row in cond):
                kwargs["value_states"] = torch.stack([row.value_states for row in cond])
            if checked.unet_balance != 1.0 and any(row.identity is not None for row in cond):
                kwargs["key_bias"] = balance_bias(torch.stack([row.identity_positions for row in cond]), balance).to(dtype)
            batch_conditions[mapper_t] = (torch.stack([row.hidden for row in cond]), kwargs or None)

        # 5. Denoising loop.
        for i, t in enumerate(timesteps):
            # 5a. This step's text condition (stage table).
            hidden, kwargs = batch_conditions[mapper_ts[i]]
            # 5b. Noise prediction on the whole batch, then guidance.
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = noise_scheduler.scale_model_input(model_input, t)
            noise_pred = backbone.unet(model_input, t, encoder_hidden_states=hidden, cross_attention_kwargs=kwargs).sample
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            # 5c. Scheduler step x_t -> x_{t-1} (ancestral schedulers draw from the per-image generators).
            latents = noise_scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            # 5d. Progress / interrupt.
            if callback_on_step_end is not None and callback_on_step_end(i + 1, total) is True:
                raise GenerationInterrupted(i + 1, total)

        # 6. Decode all images in one VAE batch.
        decoded = backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample
        images = self._image_processor.postprocess(decoded.float(), output_type="pil")

        identity_steps = sum(t is not None for t in mapper_ts)
        common = {key: value for key, value in asdict(checked).items() if key != "seeds"}
        common.update(
            band=list(band), identity_steps=identity_steps, total_steps=total,
            concept_uid=concept.uid if concept is not None else None,
            concept_steps=concept.steps_done if concept is not None else None,
            late_stage=late_stage, loras=lora.active_records(),
        )
        per_image = [dict(prompt=prompts[p], seed=s, **common) for p, s in zip(images_prompt, images_seed)]
        captions = [f"{prompts[p]} (seed {s})" for p, s in zip(images_prompt, images_seed)]
        return GenerationResult(images=images, captions=captions, settings=per_image)

    # ------------------------------------------------------------------ text conditions
    def encode_conditions(
        self, concept: Concept | None, prompts: list[str], negative_prompt: str | None,
        mapper_ts: list[int | None], balance: float = 1.0, balance_layers: int = 1,
    ) -> dict[Any, Any]:
        """Cached text rows (``.hidden`` (L, D), ``.values`` (L, D) or None) keyed (prompt index,
        mapper timestep or None), plus "negative": what composition (studio.compose) builds on."""
        return self._text_conditions(concept, prompts, negative_prompt, mapper_ts, balance, balance_layers)

    def _text_conditions(
        self,
        concept: Concept | None,
        prompts: list[str],
        negative_prompt: str | None,
        mapper_ts: list[int | None],
        balance: float,
        balance_layers: int,
    ) -> dict[Any, _EncodedRow]:
        """Rows for every (prompt index, mapper timestep or None) a call needs, plus "negative".

        Cached rows are reused; the missing ones are encoded together in one text-encoder pass.
        """
        word = concept.super_category if concept is not None else DEFAULT_SUPER_CATEGORY
        text_loras = lora.text_encoder_key()  # a text-encoder LoRA changes every row
        needed: dict[Any, _Request] = {}
        if negative_prompt is not None:
            needed["negative"] = _Request(("plain", negative_prompt, word, text_loras), "text", negative_prompt)
        for index, prompt in enumerate(prompts):
            for mapper_t in sorted(set(mapper_ts), key=lambda t: -1 if t is None else t):
                if mapper_t is None:
                    needed[(index, None)] = _Request(("plain", prompt, word, text_loras), "text", prompt)
                else:
                    group = ("identity", concept.uid, prompt, float(balance), int(balance_layers), text_loras)
                    needed[(index, mapper_t)] = _Request(group, mapper_t, prompt, mapper_t)

        found: dict[Any, _EncodedRow] = {}
        with self._lock:
            for key, request in needed.items():
                group = self._cache.get(request.group)
                if group is not None and request.entry in group:
                    found[key] = group[request.entry]
                    self._cache.move_to_end(request.group)
        missing = {key: request for key, request in needed.items() if key not in found}
        if not missing:
            return found

        # Several keys can share one request (the same prompt twice): encode each once.
        unique: dict[tuple, _Request] = {}
        for request in missing.values():
            unique.setdefault((request.group, request.entry), request)
        encoded = self._encode(concept, list(unique.values()), word, balance, balance_layers)
        with self._lock:
            self.text_encoder_calls += 1
            for request, row in zip(unique.values(), encoded):
                self._cache.setdefault(request.group, {})[request.entry] = row
                self._cache.move_to_end(request.group)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        by_request = {(r.group, r.entry): row for r, row in zip(unique.values(), encoded)}
        for key, request in missing.items():
            found[key] = by_request[(request.group, request.entry)]
        return found

    def _encode(
        self, concept: Concept | None, requests: list[_Request], word: str, balance: float, balance_layers: int
    ) -> list[_EncodedRow]:
        """One text-encoder pass over plain rows (``{}`` = the word) and identity rows.

        Identity rows carry K slots filled with mapper(t); the token injection fills slots in
        row order, so the identity vectors (n_identity, K, D) follow the identity rows' order.
        """
        backbone = self.backbone
        tokenizer = backbone.tokenizer
        slot_id = super_category_id(tokenizer, word)
        num_slots = concept.num_tokens if concept is not None else 0
        ids, masks, identity_times = [], [], []
        for request in requests:
            identity = request.mapper_t is not None
            row_ids, row_mask = tokenize(tokenizer, [request.prompt], num_slots if identity else 0, slot_id)
            ids.append(row_ids)
            masks.append(row_mask)
            if identity:
                identity_times.append(request.mapper_t)
        input_ids, identity_mask = torch.cat(ids), torch.cat(masks)

        identity = bypass = None
        if identity_times:
            mapper = concept.mapper
            mapper_device = mapper.class_embedding.device
            times = torch.tensor(identity_times, device=mapper_device)
            # The mapper runs in fp32 (it is tiny); only its output meets the backbone's dtype.
            identity = mapper(times).to(device=backbone.device, dtype=backbone.dtype)
            if mapper.has_bypass and concept.image_embedding is not None:
                embedding = concept.image_embedding.to(device=mapper_device, dtype=torch.float32)
                bypass = mapper.bypass_vectors(times, embedding).to(device=backbone.device, dtype=backbone.dtype)
        states = encode_text(
            backbone, input_ids, identity_mask, identity=identity, bypass=bypass,
            balance=balance, balance_layers=balance_layers,
        )
        rows = []
        for index, request in enumerate(requests):
            # clone(): a cached row must not keep the whole batch's storage alive.
            hidden = states.hidden[index].clone()
            values = identity_positions = None
            if request.mapper_t is not None:
                identity_positions = identity_mask[index].to(hidden.device)
                if states.values is not None:
                    values = states.values[index].clone()
            rows.append(_EncodedRow(hidden, values, identity_positions))
        return rows

    # ------------------------------------------------------------------ cache
    def clear_cache(self) -> None:
        """Forget all cached text conditions (e.g. to free memory)."""
        with self._lock:
            self._cache.clear()

    @property
    def cached_groups(self) -> int:
        with self._lock:
            return len(self._cache)


__all__ = [
    "DEFAULT_SUPER_CATEGORY",
    "GenerationInterrupted",
    "GenerationResult",
    "PlannedStep",
    "SCHEDULERS",
    "Sampler",
    "SamplerInputError",
    "stage_plan",
]


def shared_sampler(backbone: Backbone) -> Sampler:
    """One sampler (and text-condition cache) per backbone, shared by all sessions."""
    with _SHARED_LOCK:
        if id(backbone) not in _SHARED:
            _SHARED[id(backbone)] = Sampler(backbone)
        return _SHARED[id(backbone)]


def render_preview(
    sampler: Callable[..., GenerationResult], concept: Concept, cfg: StudioConfig, band: tuple[int, int], balance: float
) -> PreviewReady:
    """The preset's preview prompts and seeds for ``concept`` at ``band`` / ``balance``: what the
    trainer shows while training and the engine on a slider move. ``sampler``: a Sampler, or a
    callable with its signature."""
    settings = GenerationSettings.from_config(cfg, preview=True, band=band, balance=balance)
    with torch.no_grad():
        result = sampler(concept, list(cfg.sample.preview_prompts), **settings.kwargs())
    return PreviewReady(
        step=concept.steps_done, images=tuple(result.images), captions=tuple(result.captions), band=band, balance=balance
    )
