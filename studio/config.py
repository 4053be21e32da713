"""Typed configuration for the studio, loaded from YAML presets with omegaconf.

A preset is a YAML file in ``presets/`` whose keys mirror :class:`StudioConfig`. omegaconf
merges it onto the dataclass schema, so an unknown key or a wrong type fails with an error
that names the key; each dataclass then checks its values in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from studio.errors import StudioError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
# The shipped evaluation prompts (scenes, styles, outfits, expressions, actions).
EVAL_PROMPTS_FILE = PRESET_DIR / "eval_prompts.txt"

# The SD 1.x training scale: timesteps are integers in [0, NUM_TRAIN_TIMESTEPS).
NUM_TRAIN_TIMESTEPS = 1000

# Training photos per micro-step: each is a UNet forward and backward on the shared accelerator.
MAX_BATCH_SIZE = 8
# Views per photo (train.views): each is one VAE latent kept for the whole run.
MAX_VIEWS = 64
# torch generators take a signed 64-bit seed.
MAX_SEED = 2**63 - 1

DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
# where the tandem balance gamma acts at generation (sample.balance_target)
BALANCE_TARGETS = ("text_encoder", "unet")


class ConfigError(StudioError, ValueError):
    """A preset or a setting is invalid; the message names the key and what is allowed."""


MAX_TRAINING_PROMPTS = 64


def _check_training_prompts(prompts: list, key: str) -> None:
    """At most MAX_TRAINING_PROMPTS strings of at most 200 characters, each with exactly one ``{}``."""
    if len(prompts) > MAX_TRAINING_PROMPTS:
        raise ConfigError(f"{key} may list at most {MAX_TRAINING_PROMPTS} prompts, got {len(prompts)}")
    for prompt in prompts:
        if not isinstance(prompt, str) or len(prompt) > 200 or prompt.count("{}") != 1:
            raise ConfigError(f"each of {key} must be a text of at most 200 characters with exactly one {{}} "
                              f"where the person goes, got {str(prompt)[:80]!r}")


def check_band(band: list[int] | tuple[int, int], what: str = "band") -> tuple[int, int]:
    """Validate a timestep interval ``[lo, hi]`` on the 0..999 scale and return it as a tuple."""
    if len(band) != 2:
        raise ConfigError(f"{what} must be two timesteps [start, end], got {list(band)}")
    lo, hi = int(band[0]), int(band[1])
    if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(
            f"The {what} must start before it ends, within 0 to {NUM_TRAIN_TIMESTEPS}: got start {lo}, end {hi}."
        )
    return lo, hi


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class ModelConfig:
    """Which frozen Stable Diffusion 1.x backbone to use and where it runs."""

    # "toy" (the small model pretrained here, docs/TOY.md), "tiny" (random weights), a hub id, a local diffusers folder, or a single .safetensors
    source: str = "tiny"
    # hub revision or branch (hub ids only)
    revision: str | None = None
    # a diffusers config folder for a single-file checkpoint (needed offline)
    single_file_config: str | None = None
    # CLIP image encoder for the image bypass: "tiny", a hub id or a folder; None disables it
    image_encoder: str | None = "openai/clip-vit-base-patch32"
    # "auto" picks cuda > mps > cpu
    device: str = "auto"
    # weights dtype of the frozen parts: auto (bf16/fp16 on gpu; on cpu bf16 with AMX, else fp32), float32, bfloat16, float16
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ConfigError("model.source must name a model: 'tiny', a hub id, a folder or a .safetensors file")
        _one_of(self.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
        if self.device != "auto" and not self.device.split(":")[0] in ("cpu", "cuda", "mps"):
            raise ConfigError(f"model.device must be auto, cpu, cuda[:N] or mps; got {self.device!r}")

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"


@dataclass
class ConceptConfig:
    """Shape of the learned concept: identity tokens and the timestep mapper (docs/ALGORITHM.md, "Mapper").

    The switches ``method``, ``use_bypass``, ``bypass_input``, ``head_init``, ``late_stage`` and
    ``stage_regulation`` (with ``train.te_weight`` and ``train.cgdr_weight``) are the ablations;
    a concept file records them all.
    """

    # "personamagic" (timestep mapper, stages, bypass, TE) or "ti": the plain textual-inversion
    # baseline (one static learned token, plain MSE without the mask, no MLP, no bypass, no TE,
    # identity at every step)
    method: str = "personamagic"
    # number of identity tokens <id1> ... <idK> that stand for the person
    num_tokens: int = 4
    # the super-category word; must be a single CLIP token
    super_category: str = "face"
    # anchors of the mapper's first layer, spread evenly over the training band
    num_anchors: int = 200
    # width of the mapper's hidden layers
    hidden_dim: int = 128
    # size of the sinusoidal timestep encoding
    time_encoding_dim: int = 2048
    # learn the image-bypass branch (needs model.image_encoder)
    use_bypass: bool = True
    # probability of zeroing the bypass per training sample
    bypass_dropout: float = 0.5
    # what the bypass reads besides the image embedding: "trunk" = the mapper trunk's hidden output
    # (released; its gradient also trains the trunk), "encoding" = the raw timestep encoding (a separate branch)
    bypass_input: str = "trunk"
    # output heads' initialisation: "default" = torch's layer init (released), "zero" = start as the plain word
    head_init: str = "default"
    # identity used after the band (t < start): "band_edge" = MLP(start) (authors), "super_category"
    late_stage: str = "band_edge"
    # stage regulation: off = identity at every denoising step, and training t over the whole 0..999 range
    stage_regulation: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= 16:
            raise ConfigError(f"concept.num_tokens must be between 1 and 16, got {self.num_tokens}")
        if not self.super_category.strip() or " " in self.super_category.strip():
            raise ConfigError(f"concept.super_category must be one word, got {self.super_category!r}")
        if self.num_anchors < 1 or self.hidden_dim < 1 or self.time_encoding_dim < 2 or self.time_encoding_dim % 2:
            raise ConfigError("concept.num_anchors, hidden_dim must be >= 1 and time_encoding_dim even")
        if not 0.0 <= self.bypass_dropout <= 1.0:
            raise ConfigError(f"concept.bypass_dropout must be in [0, 1], got {self.bypass_dropout}")
        _one_of(self.late_stage, ("band_edge", "super_category"), "concept.late_stage")
        _one_of(self.method, ("personamagic", "ti"), "concept.method")
        _one_of(self.bypass_input, ("trunk", "encoding"), "concept.bypass_input")
        _one_of(self.head_init, ("default", "zero"), "concept.head_init")

    @property
    def is_ti(self) -> bool:
        """The plain textual-inversion baseline."""
        return self.method == "ti"

    @property
    def stage_regulated(self) -> bool:
        """Whether the stage table applies (never for the textual-inversion baseline)."""
        return self.stage_regulation and not self.is_ti


@dataclass
class TrainConfig:
    """Optimisation of the mapper (docs/ALGORITHM.md, "Losses")."""

    # optimiser steps (each of grad_accum micro-steps of batch_size photos)
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 2
    # effective learning rate of AdamW
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    # timesteps sampled during training: uniform in [band[0], band[1]) (0..999 without stage regulation)
    band: list[int] = field(default_factory=lambda: [400, 800])
    # weight lambda of the Tandem Equilibrium loss
    te_weight: float = 1e-3
    # balance target beta of the TE loss (0.5 = the paper)
    te_balance: float = 0.5
    # softmax temperature tau of the TE loss
    te_temperature: float = 100.0
    # weight of Face2Diffusion's class-guided denoising regularization outside the face mask (0 = off;
    # one extra no-grad UNet pass per micro-step)
    cgdr_weight: float = 0.0
    # views of each photo trained on (docs/ALGORITHM.md, "Views of the photos"): the photo plus
    # views - 1 random zoom-in crops of up to crop_jitter of its side, mirrored half the time when
    # flip; with crop_jitter 0 and flip off, the photo as prepared
    views: int = 8
    crop_jitter: float = 0.0
    flip: bool = False
    # image side in pixels fed to the VAE
    resolution: int = 512
    # autocast dtype on GPU: auto (bf16 if supported, else fp16), no, bf16, fp16; off on CPU, where the weights' dtype rules
    mixed_precision: str = "auto"
    seed: int = 0
    # preview images every N optimiser steps (and at step 0); 0 disables
    preview_every: int = 100
    # keep a rollback snapshot every N steps (NaN recovery)
    snapshot_every: int = 25
    # clip the gradient norm at this value (0 = off, as the released recipe)
    max_grad_norm: float = 0.0
    # prompts of the reconstruction loss and of the TE loss, each with one {} for the identity
    # slots; empty = the built-in lists (studio/prompts.py). A backbone with its own vocabulary
    # (the toy world) trains with prompts in its words (docs/ALGORITHM.md, "Losses").
    reconstruction_prompts: list[str] = field(default_factory=list)
    tandem_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "resolution"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ConfigError(f"train.batch_size must be at most {MAX_BATCH_SIZE} (use grad_accum for larger batches), got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"train.seed must be a whole number from 0 to {MAX_SEED}, got {self.seed}")
        if self.resolution % 64:  # 8x the VAE factor: the size previews can be rendered at
            raise ConfigError(f"train.resolution must be a multiple of 64, got {self.resolution}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        check_band(self.band, "train.band")
        if not 0.0 <= self.te_balance <= 1.0:
            raise ConfigError(f"train.te_balance must be in [0, 1], got {self.te_balance}")
        if self.te_weight < 0:
            raise ConfigError(f"train.te_weight must be >= 0, got {self.te_weight}")
        if not 1 <= self.views <= MAX_VIEWS:
            raise ConfigError(f"train.views must be a whole number from 1 to {MAX_VIEWS}, got {self.views}")
        if not 0.0 <= self.crop_jitter <= 0.5:
            raise ConfigError(f"train.crop_jitter must be in [0, 0.5] (a share of the photo's side), got {self.crop_jitter}")
        if self.cgdr_weight < 0:
            raise ConfigError(f"train.cgdr_weight must be >= 0, got {self.cgdr_weight}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        _one_of(self.mixed_precision, ("auto", "no", "bf16", "fp16"), "train.mixed_precision")
        if self.preview_every < 0 or self.snapshot_every < 1:
            raise ConfigError("train.preview_every must be >= 0 and train.snapshot_every >= 1")
        for key in ("reconstruction_prompts", "tandem_prompts"):
            _check_training_prompts(list(getattr(self, key)), f"train.{key}")


@dataclass
class SampleConfig:
    """Stage-regulated generation and the studio's previews (docs/ALGORITHM.md, "Generation")."""

    # denoising steps for generation
    steps: int = 50
    # denoising steps for the live previews (fewer = faster)
    preview_steps: int = 20
    guidance_scale: float = 8.0
    # a diffusers scheduler name, see studio.sampler.SCHEDULERS
    scheduler: str = "dpmsolver++"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # generation band: denoising steps with t in [band[0], band[1]] get the identity
    band: list[int] = field(default_factory=lambda: [400, 800])
    # tandem balance gamma: < 1 favours the prompt, > 1 the identity, 1 = neutral
    balance: float = 1.0
    # how many of the text encoder's last layers the balance gamma acts on
    balance_layers: int = 1
    # where gamma acts (docs/ALGORITHM.md, "Live tandem balance"): "unet" = the image's
    # cross-attention to the identity tokens; "text_encoder" = the prompt's words' attention to
    # them in the last balance_layers layers (the TE loss's counterpart; measured inert on toy)
    balance_target: str = "unet"
    # output side in pixels (0 = the training resolution)
    resolution: int = 0
    # fixed prompts and seeds of the live previews; "{}" stands for the person
    preview_prompts: list[str] = field(
        default_factory=lambda: ["a photo of {}", "{} as a chef in a kitchen", "an oil painting of {}", "{} reading a book in a park"]
    )
    preview_seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if self.steps < 1 or self.preview_steps < 1:
            raise ConfigError("sample.steps and sample.preview_steps must be >= 1")
        if self.guidance_scale < 0:
            raise ConfigError(f"sample.guidance_scale must be >= 0, got {self.guidance_scale}")
        check_band(self.band, "sample.band")
        if not self.balance > 0:
            raise ConfigError(f"sample.balance must be > 0, got {self.balance}")
        if self.balance_layers < 1:
            raise ConfigError(f"sample.balance_layers must be >= 1, got {self.balance_layers}")
        if self.balance_target not in BALANCE_TARGETS:
            raise ConfigError(f"sample.balance_target must be one of {', '.join(BALANCE_TARGETS)}, got {self.balance_target!r}")
        if self.resolution < 0 or self.resolution % 8:
            raise ConfigError(f"sample.resolution must be 0 or a positive multiple of 8, got {self.resolution}")
        if not self.preview_prompts or any("{}" not in p for p in self.preview_prompts):
            raise ConfigError("sample.preview_prompts must be non-empty and each must contain {} for the person")
        if not self.preview_seeds:
            raise ConfigError("sample.preview_seeds must list at least one seed")


@dataclass
class FaceConfig:
    """Face detection, alignment and masking (docs/FACES.md)."""

    # auto (insightface when its model files exist, else dlib), insightface, dlib, toy (the toy world's portraits)
    backend: str = "auto"
    # where insightface looks for models (None = ~/.insightface/models)
    insightface_root: str | None = None
    insightface_model: str = "buffalo_l"
    # side of the aligned square crop in pixels (the trainer resizes it to train.resolution)
    crop_size: int = 512
    # extra context around the face: 0 = tight face chip, 0.5 = head and some shoulders
    margin: float = 0.6
    # smallest accepted face: eye-to-mouth box side in pixels of the original photo
    min_face_px: int = 64
    # photos larger than this many pixels are downscaled before detection
    max_pixels: int = 4_000_000
    # feather of the soft mask, as a fraction of the crop side
    mask_feather: float = 0.06
    # dlib Euclidean distance above which photos count as different people (measured: same 0.33-0.53, different 0.57+)
    same_person_threshold: float = 0.6

    def __post_init__(self) -> None:
        _one_of(self.backend, ("auto", "insightface", "dlib", "toy"), "face.backend")
        if self.crop_size < 64 or self.min_face_px < 8 or self.max_pixels < 256 * 256:
            raise ConfigError("face.crop_size must be >= 64, face.min_face_px >= 8, face.max_pixels >= 65536")
        if not 0.0 <= self.margin <= 2.0:
            raise ConfigError(f"face.margin must be in [0, 2], got {self.margin}")
        if self.same_person_threshold <= 0 or self.mask_feather < 0:
            raise ConfigError(
                f"face.same_person_threshold must be > 0 and face.mask_feather >= 0, "
                f"got {self.same_person_threshold} and {self.mask_feather}"
            )


@dataclass
class MetricsConfig:
    """Scores shown on previews and generated images (identity and prompt fidelity)."""

    # CLIP for prompt scores: auto (tiny CLIP for the tiny backbone, else openai/clip-vit-large-patch14), a hub id or folder
    clip_model: str = "auto"
    # score previews and generated images, and mark the training step with the best balance
    score_images: bool = True


LOCATE_GROUPINGS = ("clusters", "tokens")


@dataclass
class ComposeConfig:
    """Several people in one picture and one-photo likeness (docs/COMPOSE.md)."""

    # most people one composed image may name ({0}, {1}, ...); each costs attention groups, a reference one UNet pass per step
    max_people: int = 2
    # share of the denoising steps that lay out the picture with class words only (regions start after them)
    layout_fraction: float = 0.3
    # width / height of a picture of two or more people, its height the preset's image size: a
    # square holds one person, a wide picture has room for two side by side (docs/COMPOSE.md);
    # a wider picture also has larger attention layers: see locate_max_tokens
    aspect: float = 1.5
    # reference-aware self-attention: weight of the reference's face pixels (0 = off, no reference pass)
    rsa_weight: float = 1.0
    # weight of the reference's other pixels (hair, background), relative to the image's own pixels at 1
    rsa_context_weight: float = 0.3
    # UNet blocks whose self-attention also attends to the references (name prefixes)
    rsa_blocks: list[str] = field(default_factory=lambda: ["mid_block", "up_blocks"])
    # [first, last) share of the denoising steps with reference attention
    rsa_steps: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # the prompt of the reference pass; {} = the person's class word
    reference_prompt: str = "a photo of {}"
    # class word of a person given by a photo only (one CLIP token)
    photo_class_word: str = "person"
    # regions are located on the finest attention layers with at most this many pixels (SD 1.x at
    # 768 x 512: its 48 x 32 layers; raise it with aspect, or the regions come from coarser layers)
    locate_max_tokens: int = 1536
    # Gaussian smoothing of the located attention maps, in pixels of that layer (0 = none)
    locate_smoothing: float = 1.0
    # how pixels are given to the background and the people (docs/COMPOSE.md, "Regions"):
    # "clusters" groups them by where they attend (self-attention), their maps and their place,
    # then names the groups by the maps and the last step's regions; "tokens" gives each pixel to
    # the map it scores highest on (two people with the same class word have alike maps)
    locate_grouping: str = "clusters"
    # weight of a pixel's place against what it attends to in "clusters" (0 = place does not
    # count; higher = rounder, more compact regions)
    locate_compactness: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.max_people <= 4:
            raise ConfigError(f"compose.max_people must be from 1 to 4, got {self.max_people}")
        if not 0.0 <= self.layout_fraction < 1.0:
            raise ConfigError(f"compose.layout_fraction must be in [0, 1), got {self.layout_fraction}")
        if not 1.0 <= self.aspect <= 3.0:
            raise ConfigError(f"compose.aspect (width / height) must be from 1 to 3, got {self.aspect}")
        if self.rsa_weight < 0 or self.rsa_context_weight < 0:
            raise ConfigError("compose.rsa_weight and compose.rsa_context_weight must be >= 0")
        if len(self.rsa_steps) != 2 or not 0.0 <= self.rsa_steps[0] < self.rsa_steps[1] <= 1.0:
            raise ConfigError(f"compose.rsa_steps must be [first, last) with 0 <= first < last <= 1, got {list(self.rsa_steps)}")
        allowed = ("down_blocks", "mid_block", "up_blocks")
        if not self.rsa_blocks or any(not b.startswith(allowed) for b in self.rsa_blocks):
            raise ConfigError(f"compose.rsa_blocks must name UNet blocks starting with {', '.join(allowed)}; got {list(self.rsa_blocks)}")
        if "{}" not in self.reference_prompt:
            raise ConfigError("compose.reference_prompt must contain {} for the person's class word")
        if self.locate_max_tokens < 16 or self.locate_smoothing < 0:
            raise ConfigError("compose.locate_max_tokens must be >= 16 and compose.locate_smoothing >= 0")
        if self.locate_compactness < 0:
            raise ConfigError(f"compose.locate_compactness must be >= 0, got {self.locate_compactness}")
        if self.locate_grouping not in LOCATE_GROUPINGS:
            raise ConfigError(
                f"compose.locate_grouping must be one of {', '.join(LOCATE_GROUPINGS)}, got {self.locate_grouping!r}")


@dataclass
class StudioConfig:
    """Everything a run needs: one preset."""

    # preset name shown in the UI
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)

    @property
    def training_band(self) -> tuple[int, int]:
        """Timesteps training samples from: ``train.band``, or all of 0..999 without stage regulation."""
        if not self.concept.stage_regulated:
            return 0, NUM_TRAIN_TIMESTEPS
        return check_band(self.train.band, "train.band")

    @property
    def image_size(self) -> int:
        """Side of previews and generated images: sample.resolution, or the training resolution."""
        return self.sample.resolution or self.train.resolution

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (saved beside outputs and inside concepts)."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> StudioConfig:
        """A validated copy with dotted-key overrides, e.g. ``replace(**{"train.steps": 10})``."""
        return config_from_dict(self.to_dict(), overrides)


def available_presets() -> list[str]:
    """Names of the presets shipped in ``presets/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_from_dict(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> StudioConfig:
    """Validate ``data`` (+ dotted overrides) against the schema and build a :class:`StudioConfig`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudioConfig), OmegaConf.create(_literal(data)))
        for key, value in (overrides or {}).items():
            OmegaConf.update(merged, key, _literal(value), merge=False)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"invalid setting {key!r}: {first_line}") from None


def _literal(value: Any) -> Any:
    """``value`` with every ``${...}`` escaped: settings are data, never omegaconf interpolations
    (``${oc.env:SECRET}`` in an imported concept or a typed prompt stays that text). Presets
    are resolved once, by load_preset, before they get here."""
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("${", "\\${") if "${" in value else value
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    return value


def load_preset(name_or_path: str | Path, **overrides: Any) -> StudioConfig:
    """Load a preset by name (``presets/NAME.yaml``) or path, with dotted-key overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {str(name_or_path)!r}; available: {', '.join(available_presets())}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"preset {path.name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path.name} must be a mapping of settings")
    data.setdefault("name", path.stem)
    return config_from_dict(data, overrides)
