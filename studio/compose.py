"""Several people in one picture, and a likeness from one photo (docs/COMPOSE.md).

A prompt names people with ``{0}``, ``{1}``, ...; each person is a trained concept, a
reference photo, or both. Two mechanisms act on the UNet's attention (``studio.attention``):

* reference-aware self-attention (RSA): each step, every reference photo's latent, noised to
  the same timestep, goes through the UNet with a class prompt; the generated image's
  self-attention also attends to the reference's inputs, face pixels weighted more;
* region-grouped attention: after a layout stage with class words only, each person's region
  is located from the attention maps (the cross-attention of their class word refined through
  self-attention and smoothed, the start token standing for the background; then the pixels
  clustered by where they attend and lie, or each given to its highest map), and the pixels of
  a region see only their own person's tokens and reference; the background sees the plain prompt.

With one person there are no regions: the person follows their concept's stage table exactly
as :class:`studio.sampler.Sampler` does, plus RSA when a photo is given.
"""
from __future__ import annotations

import inspect
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from studio import attention, lora
from studio.concept import Concept
from studio.conditioning import PromptError, encode_text, super_category_id, tokenize
from studio.config import NUM_TRAIN_TIMESTEPS, ComposeConfig
from studio.sampler import SCHEDULERS, GenerationInterrupted, Sampler, SamplerInputError, stage_plan

PERSON_RE = re.compile(r"\{(\d*)\}")
# Overlay colours and their names: background, person 0, person 1, ...
REGION_PALETTE = [("grey", (90, 90, 90)), ("red", (230, 60, 60)), ("blue", (60, 110, 235)), ("green", (60, 190, 90)),
                  ("yellow", (235, 180, 40))]
REGION_COLOURS = [rgb for _, rgb in REGION_PALETTE]
MODES = ("regions", "naive")


class ComposeInputError(SamplerInputError):
    """A composition cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Reference:
    """A reference photo of a person: an aligned RGB square and its soft face mask (H, W) in [0, 1]."""

    image: Image.Image
    mask: np.ndarray

    @classmethod
    def from_prepared(cls, photo: Any) -> Reference:
        """From a :class:`studio.faces.PreparedPhoto` (its crop and face mask)."""
        return cls(photo.crop, np.asarray(photo.mask, np.float32))


@dataclass(frozen=True)
class Person:
    """One person of a composition: a concept, a reference photo, or both.

    class_word: the person's word in the layout and plain prompts (default: the concept's
    super-category, else ``compose.photo_class_word``).
    """

    concept: Concept | None = None
    reference: Reference | None = None
    class_word: str | None = None


@dataclass(frozen=True)
class ComposeResult:
    """Images in seed order, each with its region overlay and label map.

    regions: (h, w) int arrays at latent resolution: 0 = background, p + 1 = person p
    (all zeros for a single person or naive composition).
    """

    images: list[Image.Image]
    overlays: list[Image.Image]
    regions: list[np.ndarray]
    captions: list[str]
    settings: list[dict]


@dataclass(frozen=True)
class _Row:
    """A text row like the sampler's cached ones: hidden (L, D), bypassed values (L, D) or None,
    identity (L,) bool at identity-token positions or None."""

    hidden: torch.Tensor
    values: torch.Tensor | None = None
    identity: torch.Tensor | None = None


@dataclass(frozen=True)
class _PromptLayout:
    """One text row of a composition: the prompt for the sampler and where each person's tokens are.

    prompt: ``{}`` at the focus person (None = everyone as a class word); positions[p]: token
    indices of person p in the encoded row (the K slots of the focus person, else its class word).
    """

    prompt: str
    positions: tuple[tuple[int, ...], ...]


def people_in(template: str) -> list[int]:
    """Person numbers of a prompt template in order of appearance, e.g. "{1} and {0}" -> [1, 0]."""
    return [int(m.group(1)) if m.group(1) else -1 for m in PERSON_RE.finditer(template)]


def check_template(template: str, count: int, max_people: int) -> str:
    """Strip and validate a template naming ``count`` people as {0} .. {count-1}, each once."""
    template = (template or "").strip()
    if count < 1:
        raise ComposeInputError("Choose at least one person (a concept or a photo).")
    if count > max_people:
        raise ComposeInputError(
            f"{count} people were given, but this studio composes at most {max_people} in one picture."
        )
    if not template:
        raise PromptError("The prompt is empty. Describe the picture with {0} and {1} for the people, e.g. '{0} and {1} at a café'.")
    found = people_in(template)
    if -1 in found:
        raise PromptError("Number the people in the prompt: {0} for the first, {1} for the second (a bare {} is ambiguous here).")
    wanted = list(range(count))
    if sorted(found) != wanted:
        names = " and ".join(f"{{{i}}}" for i in wanted)
        seen = ", ".join(f"{{{i}}}" for i in found) or "none"
        raise PromptError(
            f"The prompt must name each of the {count} people once as {names}; it has {seen}."
        )
    return template


def _layout(tokenizer, template: str, words: list[str], focus: int | None, num_slots: int) -> _PromptLayout:
    """Token positions of every person when ``template`` is written with ``{}`` at ``focus``
    (``num_slots`` identity slots there) and class words elsewhere."""
    positions: list[tuple[int, ...]] = [()] * len(words)
    cursor, pieces, last = 1, [], 0  # position 0 is the start token
    for match in PERSON_RE.finditer(template):
        text = template[last:match.start()]
        cursor += len(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else 0
        person = int(match.group(1))
        if person == focus and num_slots:
            width, piece = num_slots, "{}"
        else:
            width, piece = 1, words[person]
        positions[person] = tuple(range(cursor, cursor + width))
        cursor += width
        pieces += [text, piece]
        last = match.end()
    pieces.append(template[last:])
    layout = _PromptLayout("".join(pieces), tuple(positions))
    # The positions were counted piece by piece; the encoded row must have the same tokens there.
    slot_id = tokenizer(words[focus], add_special_tokens=False).input_ids[0] if focus is not None else 0
    ids, _ = tokenize(tokenizer, [layout.prompt], num_slots if focus is not None else 0, slot_id)
    for person, pos in enumerate(positions):
        expected = slot_id if (person == focus and num_slots) else tokenizer(words[person], add_special_tokens=False).input_ids[0]
        if any(int(ids[0, p]) != expected for p in pos):
            raise PromptError(
                f"Put spaces around {{{person}}} in the prompt (e.g. '{{0}} and {{1}} at a café'): glued to a word it "
                f"cannot be told apart from it."
            )
    return layout


class Composer:
    """Compose people into one picture on a shared :class:`Sampler` (its text-condition cache)."""

    def __init__(self, sampler: Sampler, config: ComposeConfig | None = None) -> None:
        self.sampler = sampler
        self.backbone = sampler.backbone
        self.config = config or ComposeConfig()

    def canvas(self, side: int, people: int) -> tuple[int, int]:
        """(height, width) of a picture of ``people`` people: one gets a ``side`` square; more get a
        picture ``side`` high and ``compose.aspect`` times as wide (rounded to a width this model
        can draw), room to stand side by side."""
        if people <= 1:
            return side, side
        return side, self.backbone.rounded_side(side * self.config.aspect)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, people: Sequence[Person], prompt: str, mode: str = "regions",
                     boxes: Sequence[Sequence[float]] | None = None, **settings: Any):
        """Fail early with a sentence. Returns (template, class words, checked GenerationSettings)."""
        people = list(people)
        template = check_template(prompt, len(people), self.config.max_people)
        if mode not in MODES:
            raise ComposeInputError(f"Unknown composition mode {mode!r}; choose one of: {', '.join(MODES)}.")
        tokenizer = self.backbone.tokenizer
        words = []
        for index, person in enumerate(people):
            if person.concept is None and person.reference is None:
                raise ComposeInputError(f"Person {{{index}}} has neither a concept nor a photo; give one of them.")
            word = person.class_word or (person.concept.super_category if person.concept else self.config.photo_class_word)
            super_category_id(tokenizer, word)
            words.append(word)
            if person.reference is not None:
                mask = np.asarray(person.reference.mask)
                if mask.ndim != 2 or not mask.max(initial=0) > 0:
                    raise ComposeInputError(f"The photo of person {{{index}}} has no face mask; prepare it again.")
        concepts = [p.concept for p in people if p.concept is not None]
        for concept in concepts:
            if concept.mapper.token_dim != self.backbone.token_dim:
                raise ComposeInputError(
                    f"A concept makes tokens of width {concept.mapper.token_dim}, but the loaded model "
                    f"({self.backbone.describe()}) reads width {self.backbone.token_dim}: it was trained on another model."
                )
        models = {_model_of(c) for c in concepts}
        if len(models) > 1:
            raise ComposeInputError(
                f"The concepts were trained on different models ({' and '.join(sorted(models))}); "
                f"compose people trained on the same model."
            )
        if boxes is not None:
            if mode == "naive":
                raise ComposeInputError(
                    "Naive composition has no regions to place: every pixel sees everyone's tokens. "
                    "Use the regions mode to place people in boxes, or give no boxes.")
            _check_boxes(boxes, len(people))
        plain = _layout(tokenizer, template, words, None, 0).prompt
        _, checked = self.sampler.check_inputs(None, [plain], **settings)
        return template, words, checked

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def __call__(
        self,
        people: Sequence[Person],
        prompt: str,
        *,
        mode: str = "regions",
        boxes: Sequence[Sequence[float]] | None = None,
        callback_on_step_end: Callable[[int, int], bool | None] | None = None,
        capture: attention.UNetAttentionControl | None = None,
        **settings: Any,
    ) -> ComposeResult:
        """One image per seed of ``people`` in ``prompt``.

        Args:
            people: the persons {0}, {1}, ... in order.
            prompt: the template, e.g. "{0} and {1} at a café".
            mode: "regions" (region-grouped attention after the layout stage) or "naive" (every
                person's tokens in one prompt for all pixels, no regions: the comparison).
            boxes: optional (x0, y0, x1, y1) per person, fractions of the image; they replace the
                located regions.
            settings: the fields of :class:`studio.sampler.GenerationSettings`.
            capture: tests only: a control whose ``capture_groups`` collects every group's
                attention probabilities on the last step.
        """
        people = list(people)
        template, words, checked = self.check_inputs(people, prompt, mode, boxes, **settings)
        cfg = self.config
        backbone, sampler = self.backbone, self.sampler
        tokenizer = backbone.tokenizer
        device, dtype = backbone.device, backbone.dtype
        do_cfg = checked.guidance_scale > 1.0
        seeds = checked.seeds
        count = len(people)
        grouped = mode == "regions" and count > 1

        # 1. Timesteps (fresh scheduler) and each person's stage table.
        noise_scheduler = SCHEDULERS[checked.scheduler](backbone.noise_scheduler.config)
        noise_scheduler.set_timesteps(checked.num_inference_steps, device=device)
        timesteps = noise_scheduler.timesteps
        total = len(timesteps)
        layout_steps = round(cfg.layout_fraction * total) if grouped else 0
        person_ts = [self._mapper_timesteps(p.concept, checked) for p in people]

        # 2. Text rows: the plain prompt (class words), and per person the prompt with their
        #    identity at their place (the sampler's cache encodes each once).
        negative = checked.negative_prompt if do_cfg else None
        # the tandem balance acts in the text encoder (these rows) or on the UNet's keys (_group)
        unet_balance = checked.unet_balance
        plain = _layout(tokenizer, template, words, None, 0)
        plain_rows = sampler.encode_conditions(None, [plain.prompt], negative, [None], 1.0, 1)
        person_layouts, person_rows = [], []
        for index, person in enumerate(people):
            concept = person.concept
            layout = _layout(tokenizer, template, words, index, concept.num_tokens if concept else 0)
            person_layouts.append(layout)
            if concept is None:
                person_rows.append(plain_rows)
            else:
                person_rows.append(sampler.encode_conditions(
                    concept, [layout.prompt], negative, person_ts[index], checked.text_balance, checked.balance_layers))
        naive_rows: dict[tuple, Any] = {}

        # 3. Initial latents exactly as the sampler draws them (one CPU generator per seed).
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        height, width = checked.height, checked.width
        latent_shape = (1, backbone.unet.config.in_channels, height // backbone.vae_scale_factor, width // backbone.vae_scale_factor)
        latents = torch.cat([torch.randn(latent_shape, generator=g, dtype=torch.float32) for g in generators])
        latents = latents.to(device=device, dtype=dtype) * noise_scheduler.init_noise_sigma
        num_images = len(seeds)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(noise_scheduler.step).parameters else {}

        # 4. References: their clean latents, fixed noise, class-prompt rows and pixel weights.
        with_reference = [i for i, p in enumerate(people) if p.reference is not None]
        use_rsa = bool(with_reference) and cfg.rsa_weight > 0
        if use_rsa:
            refs = self._references([people[i].reference for i in with_reference], seeds[0])
            ref_rows = sampler.encode_conditions(
                None, [cfg.reference_prompt.replace("{}", words[i]) for i in with_reference], None, [None], 1.0, 1)
            ref_hidden = torch.stack([ref_rows[(k, None)].hidden for k in range(len(with_reference))])
            ref_layers = tuple(
                name for name, module in backbone.unet.named_modules()
                if name.endswith("attn1") and name.startswith(tuple(cfg.rsa_blocks))
            )
            ref_slot = {person: k for k, person in enumerate(with_reference)}
        first_rsa, last_rsa = (int(math.floor(f * total + 1e-9)) for f in cfg.rsa_steps)

        regions = _box_regions(boxes, count, latents.shape[-2:], device) if (grouped and boxes is not None) else None
        if regions is not None:
            regions = regions.expand(num_images, -1, -1, -1)

        # 5. Denoising loop.
        for i, t in enumerate(timesteps):
            layout_stage = i < layout_steps
            # 5a. Text groups of this step: the plain prompt, then one per person (after the layout stage).
            if mode == "naive" and count > 1:
                key = tuple(ts[i] for ts in person_ts)
                if key not in naive_rows:
                    naive_rows[key] = self._naive_row(people, template, words, key, checked)
                groups = [self._group(naive_rows[key], None, plain_rows, num_images, do_cfg, unet_balance=unet_balance)]
            elif count == 1:
                groups = [self._group(person_rows[0][(0, person_ts[0][i])], None, person_rows[0], num_images, do_cfg,
                                      unet_balance=unet_balance)]
            else:
                groups = [self._group(plain_rows[(0, None)], None, plain_rows, num_images, do_cfg)]
                if not layout_stage:
                    for index in range(count):
                        others = [pos for p, pos in enumerate(person_layouts[index].positions) if p != index]
                        row = person_rows[index][(0, person_ts[index][i])]
                        own = (ref_slot[index],) if use_rsa and index in ref_slot else ()
                        groups.append(self._group(row, others, person_rows[index], num_images, do_cfg, own, unet_balance))
                    groups[0].references = ()
            rsa_now = use_rsa and first_rsa <= i < last_rsa
            locate = grouped and boxes is None and i >= layout_steps - 1 and i < total - 1
            need_control = rsa_now or len(groups) > 1 or locate or (capture is not None and i == total - 1)

            # 5b. The reference pass: record the self-attention inputs of the references at t.
            control = None
            if need_control:
                references = None
                if rsa_now:
                    noisy = noise_scheduler.add_noise(refs["latents"], refs["noise"], t.reshape(1).expand(len(refs["latents"])))
                    record = attention.UNetAttentionControl(record=True, reference_layers=ref_layers)
                    with attention.unet_context(record):
                        backbone.unet(noise_scheduler.scale_model_input(noisy, t), t, encoder_hidden_states=ref_hidden)
                    references = record.recorded
                control = capture if (capture is not None and i == total - 1) else attention.UNetAttentionControl()
                control.groups = groups
                control.regions = regions if (len(groups) > 1) else None
                control.references = references
                control.reference_weights = refs["weights"] if rsa_now else None
                control.capture_maps = locate
                control.self_map_tokens = cfg.locate_max_tokens
                control.cross_maps, control.self_maps = {}, {}
            # 5c. Noise prediction on the whole batch, then guidance.
            hidden, values, key_bias = groups[0].hidden, groups[0].values, groups[0].key_bias
            # under a control its groups carry the bias; without one the processor applies it
            kwargs = {name: v for name, v in (("value_states", values), ("key_bias", key_bias)) if v is not None}
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = noise_scheduler.scale_model_input(model_input, t)
            with attention.unet_context(control):
                noise_pred = backbone.unet(model_input, t, encoder_hidden_states=hidden, cross_attention_kwargs=kwargs or None).sample
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + checked.guidance_scale * (text - uncond)
            # 5d. Where is everyone? Regions for the next step from this step's attention maps.
            if locate:
                regions = self._locate(control, plain.positions, num_images, latents.shape[-2:], regions)
            # 5e. Scheduler step, progress / interrupt.
            latents = noise_scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None and callback_on_step_end(i + 1, total) is True:
                raise GenerationInterrupted(i + 1, total)

        # 6. Decode; overlays of the regions used on the last step.
        decoded = backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample
        images = sampler._image_processor.postprocess(decoded.float(), output_type="pil")
        if regions is not None and grouped:
            labels = [r.argmax(0).cpu().numpy().astype(np.int64) for r in regions]
        else:
            labels = [np.zeros(latents.shape[-2:], np.int64) for _ in images]
        overlays = [region_overlay(img, lab) for img, lab in zip(images, labels)]
        common = {k: v for k, v in asdict(checked).items() if k != "seeds"}
        common.update(
            prompt=template, mode=mode, people=[_describe_person(p, w) for p, w in zip(people, words)],
            layout_steps=layout_steps, rsa_weight=cfg.rsa_weight if use_rsa else 0.0,
            rsa_context_weight=cfg.rsa_context_weight, band=list(checked.band),
            boxes=[list(map(float, b)) for b in boxes] if boxes is not None else None,
            unet_passes_per_step=1 + (len(with_reference) if use_rsa else 0),
            loras=lora.active_records(),  # the style LoRAs this composition ran with (studio/lora.py)
        )
        settings_out = [dict(seed=s, **common) for s in seeds]
        captions = [f"{template} (seed {s})" for s in seeds]  # the prompt as written, {0} and {1} included
        return ComposeResult(images, overlays, labels, captions, settings_out)

    # ------------------------------------------------------------------ pieces
    def _mapper_timesteps(self, concept: Concept | None, checked) -> list[int | None]:
        """Per denoising step: the concept's mapper timestep (None = its class word), as the sampler plans it."""
        if concept is None:
            return [None] * checked.num_inference_steps
        band = checked.band if concept.stage_regulation else (0, NUM_TRAIN_TIMESTEPS)
        plan = stage_plan(self.backbone, checked.scheduler, checked.num_inference_steps, band, concept.late_stage)
        return [step.mapper_timestep for step in plan]

    def _group(self, row, masked_positions, rows, num_images: int, do_cfg: bool,
               references: tuple[int, ...] | None = None, unet_balance: float = 1.0) -> attention.TextGroup:
        """A batch group [negatives ; conditions] from a cached row; ``masked_positions``: tokens
        hidden from it; ``unet_balance``: gamma on its identity tokens' keys (1 = none)."""
        cond_hidden = row.hidden[None].expand(num_images, -1, -1)
        cond_values = None if row.values is None else row.values[None].expand(num_images, -1, -1)
        weighed = unet_balance != 1.0 and row.identity is not None
        bias = None
        if masked_positions or weighed:
            bias = attention.balance_bias(row.identity, unet_balance) if weighed else torch.zeros(len(row.hidden), device=row.hidden.device)
            for positions in masked_positions or ():
                bias[list(positions)] = float("-inf")
            bias = bias[None].expand(num_images, -1)
        if do_cfg:
            negative = rows["negative"].hidden[None].expand(num_images, -1, -1)
            hidden = torch.cat([negative, cond_hidden])
            values = None if cond_values is None else torch.cat([negative, cond_values])
            bias = None if bias is None else torch.cat([torch.zeros_like(bias), bias])
        else:
            hidden, values = cond_hidden, cond_values
        return attention.TextGroup(hidden=hidden, values=values, key_bias=bias, references=references)

    def _naive_row(self, people: list[Person], template: str, words: list[str], mapper_ts: tuple, checked):
        """One text row with every person's identity tokens at their place (the naive comparison)."""
        backbone = self.backbone
        tokenizer = backbone.tokenizer
        ids, mask, identity, bypass = [tokenizer.bos_token_id], [False], [], []
        last = 0
        for match in PERSON_RE.finditer(template):
            text = template[last:match.start()]
            ids += tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []
            mask += [False] * (len(ids) - len(mask))
            person = people[int(match.group(1))]
            t = mapper_ts[int(match.group(1))]
            word_id = super_category_id(tokenizer, words[int(match.group(1))])
            if person.concept is None or t is None:
                ids.append(word_id)
                mask.append(False)
            else:
                mapper = person.concept.mapper
                times = torch.tensor([t], device=mapper.class_embedding.device)
                ids += [word_id] * mapper.num_tokens
                mask += [True] * mapper.num_tokens
                vectors = mapper(times)[0]
                identity.append(vectors)
                if mapper.has_bypass and person.concept.image_embedding is not None:
                    embedding = person.concept.image_embedding.to(device=times.device, dtype=torch.float32)
                    bypass.append(mapper.bypass_vectors(times, embedding)[0])
                else:
                    bypass.append(torch.zeros_like(vectors))
            last = match.end()
        tail = template[last:]
        ids += tokenizer(tail, add_special_tokens=False).input_ids if tail.strip() else []
        ids.append(tokenizer.eos_token_id)
        length = tokenizer.model_max_length
        if len(ids) > length:
            raise PromptError(f"The prompt is too long: {len(ids)} tokens, the text encoder reads {length}. Shorten it.")
        mask += [False] * (length - len(mask))
        ids += [tokenizer.pad_token_id] * (length - len(ids))
        input_ids, identity_mask = torch.tensor([ids]), torch.tensor([mask])
        vectors = torch.cat(identity)[None].to(backbone.device, backbone.dtype) if identity else None
        residuals = None
        if identity and any(b.abs().sum() > 0 for b in bypass):
            residuals = torch.cat(bypass)[None].to(backbone.device, backbone.dtype)
        states = encode_text(backbone, input_ids, identity_mask if identity else None, identity=vectors, bypass=residuals,
                             balance=checked.text_balance, balance_layers=checked.balance_layers)
        return _Row(states.hidden[0], None if states.values is None else states.values[0],
                    identity_mask[0].to(states.hidden.device) if identity else None)

    def _references(self, references: list[Reference], seed: int) -> dict[str, torch.Tensor]:
        """Clean latents (R, C, h, w), fixed noise of the same shape, and pixel weights (R, H, W)."""
        backbone = self.backbone
        side = backbone.native_resolution
        pixels = []
        for ref in references:
            image = ref.image.convert("RGB").resize((side, side), Image.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        pixels = torch.stack(pixels).to(backbone.device, backbone.dtype)
        latents = backbone.vae.encode(pixels).latent_dist.mean * backbone.vae.config.scaling_factor
        generator = torch.Generator("cpu").manual_seed(seed + 7919)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        masks = []
        for ref in references:
            mask = Image.fromarray((np.clip(ref.mask, 0, 1) * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
            masks.append(torch.from_numpy(np.asarray(mask, np.float32) / 255.0))
        mask = torch.stack(masks).to(backbone.device)
        weights = self.config.rsa_weight * mask + self.config.rsa_context_weight * (1.0 - mask)
        return {"latents": latents, "noise": noise, "weights": weights}

    def _locate(self, control: attention.UNetAttentionControl, positions, num_images: int, latent_hw,
                previous: torch.Tensor | None) -> torch.Tensor:
        """Regions (n, P + 1, h, w) one-hot from this step's maps (background = the start token);
        previous: the regions of the last step, or None on the first locating step."""
        return locate_regions(control.cross_maps, control.self_maps, positions, num_images, tuple(latent_hw),
                              self.config.locate_smoothing, self.config.locate_grouping,
                              self.config.locate_compactness, previous)


# --------------------------------------------------------------------------- sessions
SOURCE_KINDS = ("session", "session+photo", "photos", "file", "photo")


@dataclass(frozen=True)
class PersonSource:
    """Where a person of a composition comes from (the studio's Compose tab).

    kind: "session" (this session's concept), "session+photo" (that concept plus the first
    prepared photo as a reference), "photos" (the first prepared photo alone: a likeness before
    training), "file" (a concept file at ``path``), "photo" (a photo file at ``path``).
    """

    kind: str
    path: str | None = None


def resolve_people(sources: Sequence[PersonSource], *, concept: Concept | None, prepared: Any, backbone: Any,
                   face: Any, class_word: str) -> tuple[list[Person], list[list[np.ndarray]]]:
    """The :class:`Person` of each source and the identity embeddings its region is scored against.

    concept / prepared: the session's concept and PreparedSet (or None); face: FaceConfig for photo files.
    """
    people, embeddings = [], []
    for index, source in enumerate(sources):
        who = f"person {{{index}}}"
        if source.kind not in SOURCE_KINDS:
            raise ComposeInputError(f"Unknown source {source.kind!r} for {who}; choose one of: {', '.join(SOURCE_KINDS)}.")
        if source.kind in ("session", "session+photo") and concept is None:
            raise ComposeInputError(f"There is no concept in this session yet for {who}: train one, import one, or pick a photo.")
        if source.kind in ("session+photo", "photos") and (prepared is None or not prepared.photos):
            raise ComposeInputError(f"{who.capitalize()} needs this session's photos: add and prepare them first.")
        if source.kind in ("file", "photo") and not source.path:
            raise ComposeInputError(f"Choose the {'concept file' if source.kind == 'file' else 'photo'} for {who}.")
        session_refs = [p.embedding for p in prepared.photos] if prepared is not None else []
        if source.kind == "session":
            people.append(Person(concept=concept))
            embeddings.append(session_refs)
        elif source.kind == "session+photo":
            people.append(Person(concept=concept, reference=Reference.from_prepared(prepared.photos[0])))
            embeddings.append(session_refs)
        elif source.kind == "photos":
            people.append(Person(reference=Reference.from_prepared(prepared.photos[0]), class_word=class_word))
            embeddings.append(session_refs)
        elif source.kind == "file":
            from studio.concept_file import load_concept

            people.append(Person(concept=load_concept(source.path, backbone)))
            embeddings.append([])
        else:
            from studio.faces import get_face_analyzer, prepare

            photos = prepare([str(source.path)], face, get_face_analyzer(face))
            if not photos.photos:
                reason = photos.reports[0].error if photos.reports else "no face found"
                raise ComposeInputError(f"The photo for {who} cannot be used: {reason}")
            people.append(Person(reference=Reference.from_prepared(photos.photos[0]), class_word=class_word))
            embeddings.append([photos.photos[0].embedding])
    return people, embeddings


def score_regions(result: ComposeResult, references: Sequence[Sequence[np.ndarray]], analyzer: Any) -> list[list[float | None]]:
    """Identity similarity of each person's region crop to that person's references, per image
    (None: no references for that person, an empty region, or no face found in it). With one
    person (no regions) the whole image is scored."""
    from studio.metrics import identity_score

    scores = []
    for image, labels in zip(result.images, result.regions):
        row = []
        for person, refs in enumerate(references):
            crop = image if len(references) == 1 else region_crop(image, labels, person)
            if crop is None or not refs:
                row.append(None)
                continue
            row.append(identity_score(crop, list(refs), analyzer).similarity)
        scores.append(row)
    return scores


# --------------------------------------------------------------------------- regions
def locate_regions(cross_maps: dict[str, torch.Tensor], self_maps: dict[str, torch.Tensor],
                   positions: Sequence[Sequence[int]], num_images: int, latent_hw: tuple[int, int],
                   smoothing: float = 1.0, grouping: str = "clusters", compactness: float = 0.5,
                   previous: torch.Tensor | None = None) -> torch.Tensor:
    """Each latent pixel to the background or one person (docs/COMPOSE.md, "Regions").

    cross_maps: layer -> (B, N, L) head-mean cross-attention of the plain prompt (the last
    ``num_images`` rows are the conditional ones); self_maps: layer -> (B, N, N) self-attention
    of the image on the finest located layers; positions[p]: person p's token indices.
    grouping: "tokens" gives each pixel to the map it scores highest on; "clusters" groups the
    pixels by their self-attention, maps and position (weighed by ``compactness``) and names the
    groups (``_group_people``). previous: the last step's regions (num_images, P + 1, h, w) or
    None; with "clusters" each region keeps its place from step to step.
    Returns a one-hot float partition (num_images, P + 1, h, w); channel 0 = background.
    """
    if not self_maps:
        raise ValueError("no self-attention maps were captured; raise compose.locate_max_tokens")
    tokens = max(m.shape[1] for m in self_maps.values())
    height, width = latent_hw
    scale = max(1, round(math.sqrt(height * width / tokens)))
    grid = (height // scale, width // scale)
    refine = torch.stack([m[-num_images:] for m in self_maps.values() if m.shape[1] == tokens]).mean(0)  # (n, N, N)
    maps = []
    for probs in cross_maps.values():
        probs = probs[-num_images:]
        layer_scale = max(1, round(math.sqrt(height * width / probs.shape[1])))
        layer_grid = (height // layer_scale, width // layer_scale)
        channels = [probs[..., 0]] + [probs[..., list(pos)].sum(-1) for pos in positions]  # (n, N) each
        stacked = torch.stack(channels, 1).reshape(num_images, len(channels), *layer_grid)
        maps.append(F.interpolate(stacked, size=grid, mode="bilinear", align_corners=False))
    located = torch.stack(maps).mean(0).flatten(2)  # (n, P+1, N)
    located = (refine @ located.transpose(1, 2)).transpose(1, 2).reshape(num_images, -1, *grid)
    if smoothing > 0:
        located = _gaussian_blur(located, smoothing)
    low = located.amin(dim=(-2, -1), keepdim=True)
    high = located.amax(dim=(-2, -1), keepdim=True)
    located = (located - low) / (high - low).clamp_min(1e-12)
    if grouping == "clusters" and len(positions) > 1:
        before = None if previous is None else F.adaptive_avg_pool2d(previous.float(), grid)
        labels = _group_people(located, refine, before, compactness)
    else:
        labels = located.argmax(1)  # (n, h', w')
    labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
    return F.one_hot(labels, len(positions) + 1).permute(0, 3, 1, 2).float()


def _group_people(located: torch.Tensor, refine: torch.Tensor, previous: torch.Tensor | None,
                  compactness: float, iterations: int = 20) -> torch.Tensor:
    """Labels (n, h, w): 0 = background, p + 1 = person p, from clustering the pixels.

    located: (n, P + 1, h, w) normalised maps (background first); refine: (n, h*w, h*w)
    self-attention; previous: (n, P + 1, h, w) share of each pixel in each region on the last
    step, or None. Each pixel is described by where it attends (its self-attention row), its
    profile over the maps, and its position times ``compactness``; k-means (cosine, farthest-point
    start) makes P + 1 groups of pixels that attend alike and lie together, so two people are two
    groups even where their class words are the same word and their maps alike. The groups are
    then named, over every one-to-one assignment, by how much of each map they cover plus, from the
    second locating step on, how much of each region of the last step.
    """
    num_images, channels, height, width = located.shape
    device = located.device
    ys, xs = torch.meshgrid(torch.linspace(-height / width, height / width, height, device=device),
                            torch.linspace(-1.0, 1.0, width, device=device), indexing="ij")
    position = torch.stack([ys.flatten(), xs.flatten()], 1)  # (N, 2), x from -1 to 1
    labels = torch.empty(num_images, height * width, dtype=torch.long, device=device)
    for b in range(num_images):
        maps = located[b].flatten(1).float()  # (P + 1, N)
        features = torch.cat([F.normalize(refine[b].float(), dim=1), F.normalize(maps.T, dim=1)], 1)
        features = F.normalize(torch.cat([F.normalize(features, dim=1), compactness * position], 1), dim=1)
        centres = [int(maps[1:].sum(0).argmax())]
        while len(centres) < channels:
            centres.append(int((features @ features[centres].T).amax(1).argmin()))
        centre_rows = features[centres]
        for _ in range(iterations):
            member = F.one_hot((features @ centre_rows.T).argmax(1), channels).float()  # (N, P + 1)
            updated = torch.where(member.sum(0)[:, None] > 0, F.normalize(member.T @ features, dim=1), centre_rows)
            if torch.allclose(updated, centre_rows):
                break
            centre_rows = updated
        group = (features @ centre_rows.T).argmax(1)
        member = F.one_hot(group, channels).float()
        share = member / member.sum(0).clamp_min(1.0)  # (N, P + 1): mean over each group's pixels
        score = maps @ share  # [region, group]; an empty group scores 0
        if previous is not None:
            score = score + previous[b].flatten(1).float() @ share
        best = max(itertools.permutations(range(channels)),
                   key=lambda order: float(sum(score[region, g] for region, g in enumerate(order))))
        for region, g in enumerate(best):
            labels[b, group == g] = region
    return labels.reshape(num_images, height, width)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, h, w) with reflect padding."""
    radius = max(1, int(math.ceil(2 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    pad_mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=pad_mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode=pad_mode)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def side_boxes(count: int) -> list[tuple[float, float, float, float]]:
    """Boxes that split the picture into ``count`` vertical strips, left to right."""
    return [(i / count, 0.0, (i + 1) / count, 1.0) for i in range(count)]


def boxes_from_strokes(layers: Sequence[np.ndarray], count: int, tolerance: float = 60.0) -> list[tuple[float, float, float, float]]:
    """One box per person from painted strokes: person p's box bounds the pixels painted in
    their overlay colour (``REGION_COLOURS[p + 1]``), as fractions of the canvas.

    layers: RGBA uint8 arrays (H, W, 4), transparent where nothing is painted; the later layer
    wins where they overlap. A pixel counts when it is mostly opaque and its colour is within
    ``tolerance`` (RGB distance) of a person's colour, so anti-aliased edges do not stretch a box.
    """
    if count >= len(REGION_PALETTE):
        raise ComposeInputError(f"Drawn regions have colours for {len(REGION_PALETTE) - 1} people, not {count}.")
    if not layers:
        raise ComposeInputError(f"Nothing is drawn: paint where each of the {count} people goes.")
    height, width = layers[0].shape[:2]
    painted = np.zeros((height, width, 3), np.float32)
    opaque = np.zeros((height, width), bool)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[:2] != (height, width) or layer.shape[2] != 4:
            raise ComposeInputError("The drawing must be one canvas of RGBA layers of the same size.")
        solid = layer[..., 3] > 127
        painted[solid] = layer[..., :3][solid]
        opaque |= solid
    boxes = []
    for person in range(count):
        name, rgb = REGION_PALETTE[person + 1]
        colour = np.asarray(rgb, np.float32)
        ys, xs = np.nonzero(opaque & (np.linalg.norm(painted - colour, axis=-1) < tolerance))
        if len(xs) == 0:
            raise ComposeInputError(
                f"Nothing is drawn in {name} for person {{{person}}}: pick the brush's {name} colour and "
                f"paint over where {{{person}}} goes."
            )
        boxes.append((xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height))
    return boxes


def _check_boxes(boxes: Sequence[Sequence[float]], count: int) -> None:
    if len(boxes) != count:
        raise ComposeInputError(f"Give one box per person: {count} people, {len(boxes)} boxes.")
    for index, box in enumerate(boxes):
        if len(box) != 4:
            raise ComposeInputError(f"The box of person {{{index}}} must be four numbers x0, y0, x1, y1.")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ComposeInputError(
                f"The box of person {{{index}}} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                f"(fractions of the picture), got {list(box)}."
            )


def _box_regions(boxes, count: int, latent_hw, device) -> torch.Tensor:
    """(1, P + 1, h, w) one-hot regions from boxes (a later box wins where boxes overlap)."""
    height, width = (int(v) for v in latent_hw)
    labels = torch.zeros(height, width, dtype=torch.long)
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        top, bottom = int(round(y0 * height)), max(int(round(y1 * height)), int(round(y0 * height)) + 1)
        left, right = int(round(x0 * width)), max(int(round(x1 * width)), int(round(x0 * width)) + 1)
        labels[top:bottom, left:right] = index + 1
    return F.one_hot(labels, count + 1).permute(2, 0, 1)[None].float().to(device)


def region_overlay(image: Image.Image, labels: np.ndarray, strength: float = 0.45) -> Image.Image:
    """The image tinted by region (grey background, then one colour per person)."""
    colours = np.asarray(REGION_COLOURS, np.float32)
    tint = colours[np.clip(labels, 0, len(colours) - 1)]
    tint = np.asarray(Image.fromarray(tint.astype(np.uint8)).resize(image.size, Image.NEAREST), np.float32)
    base = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray((base * (1 - strength) + tint * strength).clip(0, 255).astype(np.uint8))


def region_crop(image: Image.Image, labels: np.ndarray, person: int, margin: float = 0.1) -> Image.Image | None:
    """The square crop around person ``person``'s region (None when the region is empty)."""
    mask = labels == person + 1
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    sy, sx = image.height / labels.shape[0], image.width / labels.shape[1]
    top, bottom, left, right = ys.min() * sy, (ys.max() + 1) * sy, xs.min() * sx, (xs.max() + 1) * sx
    side = max(bottom - top, right - left) * (1 + margin)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    box = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
    return image.crop(box)


def _model_of(concept: Concept) -> str:
    fingerprint = concept.backbone or {}
    return str(fingerprint.get("model_id") or fingerprint.get("source") or "an unknown model")


def _describe_person(person: Person, word: str) -> dict:
    return {
        "class_word": word,
        "concept_uid": person.concept.uid if person.concept is not None else None,
        "photo": person.reference is not None,
    }


def unet_passes_per_step(people: Sequence[Person], config: ComposeConfig) -> int:
    """UNet passes per denoising step: the image batch, plus one per reference photo with RSA on."""
    references = sum(p.reference is not None for p in people)
    return 1 + (references if config.rsa_weight > 0 else 0)


__all__ = [
    "ComposeInputError",
    "ComposeResult",
    "Composer",
    "Person",
    "PersonSource",
    "Reference",
    "check_template",
    "locate_regions",
    "people_in",
    "region_crop",
    "region_overlay",
    "resolve_people",
    "score_regions",
    "side_boxes",
    "unet_passes_per_step",
]
