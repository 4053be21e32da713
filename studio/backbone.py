"""The frozen Stable Diffusion 1.x parts, loaded once per process and shared read-only.

Sources: ``"tiny"`` (small random-weight models built from configs, fully offline; images are
noise), a hub id, a local diffusers folder, or a single ``.safetensors`` checkpoint. Nothing
here is ever mutated after load: identity tokens are injected per call (see
``studio.attention``), never written into the shared embedding table.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil as CLIPImageProcessor,  # PIL backend: no torchvision needed
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from studio import attention
from studio.config import ModelConfig
from studio.weights import (  # noqa: F401  (BackboneUnavailable, local_or_hub_folder, ... are used via this module)
    HUB_PATTERNS as _HUB_PATTERNS,
    IMAGE_ENCODER_FILES as _IMAGE_ENCODER_PATTERNS,
    TINY_TEXT_LAYERS,
    TINY_TEXT_WIDTH,
    TOKENIZER_DIR,
    BackboneUnavailable,
    check as check_model,
    ModelFiles,
    hub_snapshot,
    image_encoder_folder,
    local_or_hub_folder,
    looks_like_hub_id,
    resolve_model,
    sd_missing_message,
    tensor_digest,
)

log = logging.getLogger(__name__)

# SD 1.x noise schedule (the scheduler_config.json shipped with SD 1.5).
SD15_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

@dataclass(frozen=True, eq=False)
class Backbone:
    """The frozen SD 1.x components plus where they run. Shared by every session; read-only."""

    source: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    image_encoder: CLIPVisionModelWithProjection | None
    image_processor: CLIPImageProcessor | None
    device: torch.device
    dtype: torch.dtype
    # identity of the weights (see model_id): the same model by folder, file or hub id matches
    model_id: str = ""
    # sentences about how it was loaded (e.g. an fp16 upcast), shown once by the CLI and the app
    notes: tuple[str, ...] = ()

    @property
    def is_random(self) -> bool:
        """True for the tiny demo backbone: its images are noise."""
        return self.source == "tiny"

    @property
    def token_dim(self) -> int:
        """Width of the text encoder's token embeddings (768 for SD 1.x)."""
        return self.text_encoder.config.hidden_size

    @property
    def num_text_layers(self) -> int:
        return self.text_encoder.config.num_hidden_layers

    @property
    def image_embed_dim(self) -> int | None:
        return None if self.image_encoder is None else self.image_encoder.config.projection_dim

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD 1.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides this model draws are multiples of it (64 for SD 1.x: 8 latent cells)."""
        return 8 * self.vae_scale_factor

    def rounded_side(self, side: float) -> int:
        """``side`` in pixels rounded to the nearest side this model draws (at least one multiple)."""
        return max(self.size_multiple, self.size_multiple * round(side / self.size_multiple))

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def fingerprint(self) -> dict[str, Any]:
        """What a saved concept must match to be used with this backbone."""
        return {
            "source": self.source,
            "token_dim": self.token_dim,
            "text_layers": self.num_text_layers,
            "vocab_size": self.text_encoder.config.vocab_size,
            "image_embed_dim": self.image_embed_dim,
            "model_id": self.model_id,
        }

    def describe(self) -> str:
        kind = "tiny random-weight demo model" if self.is_random else self.source
        return f"{kind} on {self.device.type} ({str(self.dtype).removeprefix('torch.')})"


# --------------------------------------------------------------------------- device / dtype
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX tiles (Intel Xeon 4th gen and later), where oneDNN runs bf16
    convolutions and matmuls 4-7x faster than fp32 (bench/RESULTS.md, finding 2). Elsewhere
    bf16 kernels fall back to reference code, slower than fp32 (one 3×3 conv measured 360× slower on Zen 3)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so probe with care
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (or fp16) on accelerators; on CPU bf16 only with AMX, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        try:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        except Exception:  # ZeroGPU emulates cuda at import time; its GPUs (Hopper) have bf16
            return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16_matrix_units() else torch.float32


# --------------------------------------------------------------------------- tiny backbone
def load_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer shipped in assets/ (identical to SD 1.x's)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder of width 32 that reads the real tokenizer's ids."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
    )


def tiny_vision_config() -> CLIPVisionConfig:
    """A 2-layer CLIP vision encoder of width 32 on 32 px images, projection 32."""
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=4, projection_dim=32,
    )


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


_GLOBAL_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules whose layers initialise from torch's global CPU RNG, seeded with ``seed``,
    without disturbing anyone else's stream: a fork of the RNG, under one process-wide lock
    (sessions build trainers and models on their own threads)."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """Small SD-1.x-shaped components with random weights (diffusers' test sizes), offline.

    UNet on 32x32 latents, 2x VAE (64 px images), 2-layer CLIP text encoder of width 32.
    """
    tokenizer = load_tokenizer()
    with seeded_init(seed):
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=64,
        )
        image_encoder = CLIPVisionModelWithProjection(tiny_vision_config())
    image_processor = tiny_image_processor()
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        noise_scheduler=DDPMScheduler(**SD15_SCHEDULER_CONFIG),
        image_encoder=image_encoder,
        image_processor=image_processor,
    )


# --------------------------------------------------------------------------- real weights
def _missing_message(repo_id: str, why: str) -> str:
    return sd_missing_message(repo_id, why)


def _load_sd_folder(files: ModelFiles, dtype: torch.dtype) -> dict[str, Any]:
    """A diffusers folder (or hub snapshot); each component in its own safetensors variant."""
    folder = str(files.path)
    try:
        scheduler_cfg = DDPMScheduler.load_config(folder, subfolder="scheduler")
        common = dict(dtype=dtype, use_safetensors=True)
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", variant=files.variants.get("text_encoder"), **common
            ),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=files.variants.get("unet"), **common),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", variant=files.variants.get("vae"), **common),
            noise_scheduler=DDPMScheduler.from_config(scheduler_cfg),
        )
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise BackboneUnavailable(f"could not load the model in {folder}: {type(exc).__name__}: {exc}") from None


def _tensors_with_prefix(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Only the tensors of one component: the rest of the checkpoint stays on disk."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}


def _load_single_file(files: ModelFiles, dtype: torch.dtype) -> dict[str, Any]:
    """An original (LDM-layout) SD 1.x checkpoint, one component at a time, with the configs of
    ``files.config_dir`` (assets/sd15-config unless model.single_file_config says otherwise):
    no network, no safety checker, no feature extractor, and at most one component's tensors
    in memory beside the models built so far."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    path, config = files.path, str(files.config_dir)
    try:
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, _tensors_with_prefix(path, ("cond_stage_model.transformer.",)),
            subfolder="text_encoder", config=config, torch_dtype=dtype, local_files_only=True,
        )
        unet = UNet2DConditionModel.from_single_file(
            _tensors_with_prefix(path, ("model.diffusion_model.",)),
            config=config, subfolder="unet", dtype=dtype, local_files_only=True,
        )
        vae = AutoencoderKL.from_single_file(
            _tensors_with_prefix(path, ("first_stage_model.",)),
            config=config, subfolder="vae", dtype=dtype, local_files_only=True,
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise BackboneUnavailable(
            f"could not load the checkpoint {path.name} with the configs in {config} ({type(exc).__name__}): it "
            f"may be a model of another shape; set model.single_file_config to its diffusers config folder, or "
            f"use its diffusers folder."
        ) from None
    tokenizer_dir = files.config_dir / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir.is_dir() else load_tokenizer()
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
        noise_scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(config, subfolder="scheduler")),
    )


def _load_image_encoder(folder: Path, dtype: torch.dtype) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    try:
        return (
            CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=dtype, use_safetensors=True),
            CLIPImageProcessor.from_pretrained(str(folder)),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise BackboneUnavailable(f"could not load the CLIP image encoder in {folder}: {exc}") from None


def weights_available(cfg: ModelConfig) -> bool:
    """True if ``cfg`` (model and image encoder) loads without a download and passes the checks."""
    if cfg.is_tiny:
        return True
    try:
        image_encoder_folder(cfg.image_encoder)
        resolve_model(cfg)
        return True
    except BackboneUnavailable:
        return False


def load_components(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Load (not move) the frozen parts named by ``cfg``; raises :class:`BackboneUnavailable`."""
    if cfg.is_tiny:
        parts = tiny_components()
        if cfg.image_encoder != "tiny":
            parts["image_encoder"] = parts["image_processor"] = None
        if cfg.image_encoder not in (None, "tiny"):
            parts["image_encoder"], parts["image_processor"] = _load_image_encoder(image_encoder_folder(cfg.image_encoder), dtype)
        return parts
    files, encoder = check_model(cfg)  # image encoder first, then the model's configs
    if files.layout == "single_file":
        parts = _load_single_file(files, dtype)
    else:
        parts = _load_sd_folder(files, dtype)
    parts["image_encoder"] = parts["image_processor"] = None
    if encoder is not None:
        parts["image_encoder"], parts["image_processor"] = _load_image_encoder(encoder, dtype)
    elif cfg.image_encoder == "tiny":  # random CLIP vision of the tiny backbone (tests, demos)
        with seeded_init(0):
            parts["image_encoder"] = CLIPVisionModelWithProjection(tiny_vision_config())
        parts["image_processor"] = tiny_image_processor()
    parts["notes"] = loading_notes(files, dtype)
    return parts


def loading_notes(files: ModelFiles, dtype: torch.dtype) -> tuple[str, ...]:
    """Sentences for people about how the weights were loaded (e.g. an fp16 upcast on CPU)."""
    if files.half_precision and dtype == torch.float32:
        return (
            "the weights are stored in half precision and run upcast to float32 (model.dtype auto on a CPU: "
            "half-precision kernels there are several times slower; set model.dtype to keep them as stored)",
        )
    return ()


def model_id(parts: dict[str, Any]) -> str:
    """Model identity from the weights themselves: the same model by folder, file or hub id (in fp32
    or fp16) gives the same id; a fine-tune does not."""
    picks = {
        "text.embed": parts["text_encoder"].get_input_embeddings().weight,
        "unet.conv_in": parts["unet"].conv_in.weight,
        "unet.conv_out": parts["unet"].conv_out.weight,
        "unet.mid": next(iter(parts["unet"].mid_block.parameters())),
        "vae.decoder": parts["vae"].decoder.conv_out.weight,
    }
    return tensor_digest(picks)


# What the UNet may predict: the training target is ε or v; the studio has no loss for "sample".
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(scheduler_config: Any) -> None:
    """Raise :class:`BackboneUnavailable` unless the noise schedule predicts ε or v."""
    kind = scheduler_config.get("prediction_type", "epsilon") if hasattr(scheduler_config, "get") else "epsilon"
    if kind not in PREDICTION_TYPES:
        raise BackboneUnavailable(
            f"This model's scheduler predicts {kind!r}; the studio trains only models that predict the noise "
            f"('epsilon', as SD 1.x) or the velocity ('v_prediction'). Use an SD 1.x model with one of those."
        )


def assemble_backbone(source: str, parts: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Backbone:
    """Freeze and place loaded ``parts`` (the Backbone's fields) and install the attention hooks."""
    check_prediction_type(parts["noise_scheduler"].config)
    identity = model_id(parts)  # before the cast: a bf16 copy of the same weights is the same model
    for name in ("text_encoder", "unet", "vae", "image_encoder"):
        module = parts[name]
        if module is not None:
            module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if dtype in (torch.bfloat16, torch.float16):
        # NHWC convolutions: previews 11 % faster at 512 px in bf16 on an AMX CPU; in fp32 they
        # were 6-12 % slower there, so fp32 stays NCHW (bench/RESULTS.md, finding 5).
        for name in ("unet", "vae"):
            parts[name].to(memory_format=torch.channels_last)
    attention.install(parts["text_encoder"], parts["unet"])
    notes = tuple(parts.pop("notes", ()))
    return Backbone(source=source, device=device, dtype=dtype, model_id=identity, notes=notes, **parts)


def build_backbone(cfg: ModelConfig) -> Backbone:
    """Load, freeze and place the backbone described by ``cfg`` (uncached; see get_backbone)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    return assemble_backbone(cfg.source, load_components(cfg, dtype), device, dtype)


_CACHE: dict[tuple, Backbone] = {}
_CACHE_LOCK = threading.Lock()


def get_backbone(cfg: ModelConfig) -> Backbone:
    """The process-wide shared backbone for ``cfg`` (loaded on first use, then reused)."""
    key = (cfg.source, cfg.revision, cfg.single_file_config, cfg.image_encoder, cfg.device, cfg.dtype)
    with _CACHE_LOCK:
        if key not in _CACHE:
            with quiet_loading():
                _CACHE[key] = build_backbone(cfg)
        return _CACHE[key]


@contextlib.contextmanager
def quiet_loading():
    """Silence progress bars and info logs of diffusers/transformers while loading."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
