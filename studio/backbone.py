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

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
# the pretrained toy world (docs/TOY.md): a diffusers folder plus its image encoder
TOY_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"

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

# Only these files are fetched from a hub repo: safetensors weights, configs, tokenizer.
_HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
_IMAGE_ENCODER_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors"]


class BackboneUnavailable(RuntimeError):
    """The requested weights cannot be loaded; the message says which files and how to get them.

    ``reason`` is the cause alone (e.g. "not in the local cache"), for callers that give their own advice.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


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
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
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
def hub_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> str:
    """Local folder of a hub repo: from the cache, else downloaded; never hangs offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        why = "HF_HUB_OFFLINE is set and it is not in the local cache"
        raise BackboneUnavailable(_missing_message(repo_id, why), reason=why)
    # Short timeouts: with no network the first request fails within seconds.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        why = f"download failed: {type(exc).__name__}: {exc}"
        raise BackboneUnavailable(_missing_message(repo_id, why), reason=why) from None


def looks_like_hub_id(source: str) -> bool:
    """``owner/name``: not a path (absolute, ``.``/``~``-relative) and exactly one slash."""
    return not (Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") != 1)


def local_or_hub_folder(source: str, revision: str | None, patterns: list[str], what: str) -> str:
    """The folder for ``source``: an existing local folder (``~`` expanded), else a hub id's
    snapshot; anything else is a :class:`BackboneUnavailable` naming ``what`` it was for."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if not looks_like_hub_id(source):
        raise BackboneUnavailable(f"{what} {source!r} is neither a folder here nor a hub id (owner/name)")
    return hub_snapshot(source, revision, patterns)


def _missing_message(repo_id: str, why: str) -> str:
    return (
        f"Model {repo_id!r} is not available ({why}). Download it where there is internet, e.g. "
        f"`hf download {repo_id} --local-dir models/{repo_id.split('/')[-1]}`, then pass that folder "
        f"(or a single .safetensors checkpoint) as the model source; or use the 'tiny' preset to try the "
        f"studio offline."
    )


def _load_sd_folder(folder: str, dtype: torch.dtype) -> dict[str, Any]:
    root = Path(folder)
    missing = [
        sub
        for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
        if not (root / sub).is_dir()
    ]
    if missing:
        raise BackboneUnavailable(
            f"{folder} is not a Stable Diffusion 1.x diffusers folder: missing {', '.join(missing)}/"
        )
    try:
        scheduler_cfg = DDPMScheduler.load_config(folder, subfolder="scheduler")
        return dict(
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype, use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype, use_safetensors=True),
            noise_scheduler=DDPMScheduler.from_config(scheduler_cfg),
        )
    except (OSError, ValueError) as exc:
        raise BackboneUnavailable(f"could not load the model in {folder}: {exc}") from None


def _load_single_file(path: str, config: str | None, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except Exception as exc:
        raise BackboneUnavailable(
            f"could not load the checkpoint {path}: {exc}. A single-file checkpoint needs a diffusers "
            f"config folder for SD 1.5 (set model.single_file_config) when there is no network."
        ) from None
    return dict(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )


def _load_image_encoder(source: str, dtype: torch.dtype) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    folder = local_or_hub_folder(source, None, _IMAGE_ENCODER_PATTERNS, "the CLIP image encoder (model.image_encoder)")
    try:
        return (
            CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, use_safetensors=True),
            CLIPImageProcessor.from_pretrained(folder),
        )
    except (OSError, ValueError) as exc:
        raise BackboneUnavailable(f"could not load the CLIP image encoder {source!r}: {exc}") from None


def weights_available(cfg: ModelConfig) -> bool:
    """True if ``cfg`` can load without a download (tiny, a local file/folder, or hub-cached)."""
    if cfg.is_tiny:
        return True
    if cfg.source == "toy":
        return (TOY_DIR / "unet").is_dir()
    path = Path(cfg.source).expanduser()
    if path.suffix == ".safetensors" or path.is_dir():
        return path.exists()
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=_HUB_PATTERNS, local_files_only=True)
        return True
    except Exception:
        return False


def load_components(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Load (not move) the frozen parts named by ``cfg``; raises :class:`BackboneUnavailable`."""
    if cfg.is_tiny:
        parts = tiny_components()
        if cfg.image_encoder != "tiny":
            parts["image_encoder"] = parts["image_processor"] = None
        return parts
    # the toy backbone is an ordinary local diffusers folder, shipped in assets/toy
    source = str(TOY_DIR) if cfg.source == "toy" else cfg.source
    path = Path(source).expanduser()
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise BackboneUnavailable(
            f"{path.name}: pickled checkpoints are not loaded (they can run code). Use a .safetensors file."
        )
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise BackboneUnavailable(f"checkpoint file not found: {path}")
        parts = _load_single_file(str(path), cfg.single_file_config, dtype)
    else:
        what = "the model source (a folder, a .safetensors file or a hub id)"
        parts = _load_sd_folder(local_or_hub_folder(source, cfg.revision, _HUB_PATTERNS, what), dtype)
    parts["image_encoder"] = parts["image_processor"] = None
    if cfg.image_encoder:
        encoder = str(TOY_DIR / "image_encoder") if cfg.image_encoder == "toy" else cfg.image_encoder
        parts["image_encoder"], parts["image_processor"] = _load_image_encoder(encoder, dtype)
    return parts


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
    return Backbone(source=source, device=device, dtype=dtype, **parts)


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
