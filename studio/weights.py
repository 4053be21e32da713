"""Where the base model's files are and what they hold, found without importing torch.

Every check that needs no weights runs here, before any heavy import or load: pickled files
are refused, the image encoder of the bypass is found (or the advice says how to fetch it),
the layout is recognised (diffusers folder, hub-cache snapshot, fp16 variant, single-file
checkpoint) and the architecture is read from the configs (or the checkpoint's key names), so
an SDXL folder or a ``.bin``-only folder is one sentence, never a library traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import ModelConfig
from studio.errors import StudioError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# SD 1.5's configs (model_index, unet, vae, text_encoder, scheduler) for single-file checkpoints offline.
SD15_CONFIG_DIR = ASSETS / "sd15-config"
TOKENIZER_DIR = ASSETS / "tokenizer"
# the pretrained toy world (docs/TOY.md): an ordinary diffusers folder plus its image encoder,
# named "toy" as a model source and as an image encoder
TOY_DIR = ASSETS / "toy"

# The files the studio reads from an SD repo (no safety checker, no feature extractor, no .bin).
SD_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
IMAGE_ENCODER_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
# What snapshot_download may take from a hub repo: the files above and their fp16 variants.
HUB_PATTERNS = [
    "model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json", "text_encoder/model*.safetensors",
    "unet/diffusion_pytorch_model*.safetensors", "vae/diffusion_pytorch_model*.safetensors",
]
COMPONENTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "this studio supports Stable Diffusion 1.x and 2.x models (UNet with one CLIP text encoder)"
SD1, SD2 = "Stable Diffusion 1.x", "Stable Diffusion 2.x"
TINY_TEXT_WIDTH, TINY_TEXT_LAYERS = 32, 2  # the tiny backbone's text encoder (studio.backbone builds it)


class BackboneUnavailable(StudioError, RuntimeError):
    """The requested weights cannot be loaded; the message says which files and how to get them.

    ``reason`` is the cause alone (e.g. "not in the local cache"), for callers that give their own advice.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class ModelFiles:
    """A base model found on disk: its layout, where its configs are, and what it is."""

    source: str
    # "tiny", "folder" (a diffusers folder or hub snapshot) or "single_file"
    layout: str
    path: Path | None = None
    # the diffusers folder whose configs describe the model (the single-file config for a checkpoint)
    config_dir: Path | None = None
    architecture: str = SD1
    # weights file per component (folders only), e.g. {"unet": ".../diffusion_pytorch_model.fp16.safetensors"}
    weights: dict[str, Path] = field(default_factory=dict)
    # safetensors variant per component (None = the plain file)
    variants: dict[str, str | None] = field(default_factory=dict)
    # the stored weights are half precision (fp16 variant or F16 tensors)
    half_precision: bool = False

    def text_config(self) -> dict[str, Any]:
        return read_json(self.config_dir / "text_encoder" / "config.json") if self.config_dir else {}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BackboneUnavailable(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BackboneUnavailable(f"{path} is not a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (names, dtypes, shapes), read without the tensors."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            return json.loads(handle.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise BackboneUnavailable(f"{path} is not a readable .safetensors file ({exc})") from None


# --------------------------------------------------------------------------- hub
def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def looks_like_hub_id(source: str) -> bool:
    """``owner/name``: not a path (absolute, ``.``/``~``-relative) and exactly one slash."""
    return not (Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") != 1)


def download_command(repo_id: str, files: tuple[str, ...]) -> str:
    return f"hf download {repo_id} {' '.join(files)}"


def sd_missing_message(repo_id: str, why: str) -> str:
    return (
        f"Model {repo_id!r} is not available ({why}). Where there is internet, fetch only the files the studio "
        f"uses: `{download_command(repo_id, SD_FILES)}` (into the hub cache; add `--local-dir models/"
        f"{repo_id.split('/')[-1]}` for a folder), then pass the hub id, that folder or a single .safetensors "
        f"checkpoint as the model source; or use the 'tiny' preset to try the studio offline."
    )


def image_encoder_missing_message(source: str, why: str) -> str:
    fetch = download_command(source, IMAGE_ENCODER_FILES) if looks_like_hub_id(source) else (
        f"a folder holding {', '.join(IMAGE_ENCODER_FILES)}"
    )
    return (
        f"The CLIP image encoder {source!r} (model.image_encoder) is not available ({why}). It feeds the image "
        f"bypass, which gives the concept a CLIP embedding of the photo. Fetch exactly its files where there is "
        f"internet: `{fetch}` (or pass a local folder with `--image-encoder DIR`), or train without the bypass: "
        f"`--set concept.use_bypass=false --set model.image_encoder=null`."
    )


def hub_snapshot(repo_id: str, revision: str | None, patterns: list[str], missing: Any = None) -> str:
    """Local folder of a hub repo: from the cache, else downloaded; never hangs offline.

    ``missing(why)`` builds the message when it cannot be had (default: the SD advice).
    """
    missing = missing or (lambda why: sd_missing_message(repo_id, why))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local cache"
        raise BackboneUnavailable(missing(why), reason=why)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # with no network the first request fails within seconds
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        why = f"download failed: {type(exc).__name__}: {exc}"
        raise BackboneUnavailable(missing(why), reason=why) from None


def local_or_hub_folder(source: str, revision: str | None, patterns: list[str], what: str, missing: Any = None) -> str:
    """The folder for ``source``: an existing local folder (``~`` expanded), else a hub id's
    snapshot; anything else is a :class:`BackboneUnavailable` naming ``what`` it was for."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if not looks_like_hub_id(source):
        raise BackboneUnavailable(f"{what} {source!r} is neither a folder here nor a hub id (owner/name)")
    return hub_snapshot(source, revision, patterns, missing or (lambda why: sd_missing_message(source, why)))


# --------------------------------------------------------------------------- checks
def refuse_pickles(source: str) -> None:
    """``.ckpt``/``.bin``/``.pt`` files can run code when loaded: refused before anything is imported."""
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BackboneUnavailable(
            f"{path.name}: pickled checkpoints are not loaded (they can run code). Use a .safetensors file "
            f"(most models publish one) or a diffusers folder with .safetensors weights."
        )


def image_encoder_folder(source: str | None) -> Path | None:
    """The folder of the bypass's CLIP image encoder (None for "tiny" or no encoder), checked first."""
    if source in (None, "", "tiny"):
        return None
    if source == "toy":
        source = str(TOY_DIR / "image_encoder")
    refuse_pickles(source)
    what = "the CLIP image encoder (model.image_encoder)"
    folder = Path(local_or_hub_folder(
        source, None, list(IMAGE_ENCODER_FILES), what, lambda why: image_encoder_missing_message(source, why)
    ))
    absent = [name for name in IMAGE_ENCODER_FILES if not (folder / name).is_file()]
    if absent:
        why = f"{folder} has no {', '.join(absent)}"
        if "model.safetensors" in absent and (folder / "pytorch_model.bin").is_file():
            why += " (only pytorch_model.bin, which is not loaded: it can run code)"
        raise BackboneUnavailable(image_encoder_missing_message(source, why), reason=why)
    return folder


def _find_weights(folder: Path, component: str) -> tuple[Path, str | None]:
    """The component's safetensors file and its variant (``fp16`` for ``*.fp16.safetensors``)."""
    sub, stem = folder / component, COMPONENTS[component]
    plain = sub / f"{stem}.safetensors"
    if plain.is_file() or (sub / f"{stem}.safetensors.index.json").is_file():
        return plain, None
    variants = sorted(p for p in sub.glob(f"{stem}.*.safetensors") if p.name.count(".") == 2)
    if variants:
        preferred = [p for p in variants if p.name.split(".")[1] == "fp16"] or variants
        return preferred[0], preferred[0].name.split(".")[1]
    if any(sub.glob("*.bin")):
        raise BackboneUnavailable(
            f"{sub} holds only .bin (pickled) weights, which are not loaded (they can run code). Download the "
            f"model's .safetensors files instead (e.g. `hf download REPO {component}/{stem}.safetensors`)."
        )
    raise BackboneUnavailable(f"{sub} has no weights ({stem}.safetensors)")


def folder_architecture(folder: Path) -> str:
    """What a diffusers folder holds, read from its configs; refuses anything but SD 1.x / 2.x."""
    name = str(folder)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name", ""))
    families = (("StableDiffusionXL", "Stable Diffusion XL"), ("StableDiffusion3", "Stable Diffusion 3"),
                ("Flux", "FLUX"), ("Kandinsky", "Kandinsky"), ("PixArt", "PixArt"))
    for marker, family in families:
        if marker in pipeline:
            raise BackboneUnavailable(f"{name} is a {family} model ({pipeline} in model_index.json); {SUPPORTED}.")
    if "transformer" in index or (folder / "transformer").is_dir():
        raise BackboneUnavailable(f"{name} is a transformer-based model ({pipeline or 'a transformer/ folder'}); {SUPPORTED}.")
    if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir():
        raise BackboneUnavailable(f"{name} has two text encoders (Stable Diffusion XL style); {SUPPORTED}.")
    missing = [sub for sub in ("text_encoder", "unet", "vae", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise BackboneUnavailable(f"{name} is not a Stable Diffusion 1.x diffusers folder: missing {', '.join(missing)}/")
    unet = read_json(folder / "unet" / "config.json")
    text = read_json(folder / "text_encoder" / "config.json")
    if unet.get("addition_embed_type") == "text_time":
        raise BackboneUnavailable(f"{name} is a Stable Diffusion XL model (its UNet takes text_time embeddings); {SUPPORTED}.")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise BackboneUnavailable(f"{name} has a {unet.get('_class_name')} where a UNet2DConditionModel should be; {SUPPORTED}.")
    if unet.get("in_channels", 4) != 4:
        raise BackboneUnavailable(
            f"{name} is an inpainting or other special UNet ({unet.get('in_channels')} input channels, not 4); {SUPPORTED}."
        )
    width = text.get("hidden_size")
    if unet.get("cross_attention_dim") != width:
        raise BackboneUnavailable(
            f"{name}: its UNet attends to width {unet.get('cross_attention_dim')} but its text encoder has width "
            f"{width}; {SUPPORTED}."
        )
    return SD2 if text.get("hidden_act") == "gelu" or unet.get("use_linear_projection") else SD1


def checkpoint_architecture(path: Path, header: dict[str, Any]) -> str:
    """What a single-file checkpoint holds, from its tensor names (original LDM layout)."""
    keys = [key for key in header if key != "__metadata__"]

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    found = None
    if has("conditioner.embedders."):
        found = "a Stable Diffusion XL checkpoint (conditioner.embedders.* tensors)"
    elif has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        found = "a Stable Diffusion 3 checkpoint (joint_blocks.* tensors)"
    elif has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        found = "a FLUX checkpoint (double_blocks.* tensors)"
    elif has("down_blocks.") and not has("model.diffusion_model."):
        found = "weights in diffusers layout (one component, not a full checkpoint); pass its diffusers folder instead"
    elif not (has("model.diffusion_model.") and has("first_stage_model.")):
        sample = ", ".join(keys[:2]) or "no tensors"
        found = f"not a Stable Diffusion checkpoint (tensors such as {sample})"
    if found:
        raise BackboneUnavailable(f"{path.name} is {found}; {SUPPORTED}.")
    if has("cond_stage_model.model."):
        raise BackboneUnavailable(
            f"{path.name} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder): as a single file only 1.x "
            f"loads offline; use its diffusers folder (SD 2.x folders are supported)."
        )
    if not has("cond_stage_model.transformer."):
        raise BackboneUnavailable(f"{path.name} has no CLIP text encoder (cond_stage_model.transformer.*); {SUPPORTED}.")
    return SD1


def _check_checkpoint_shapes(path: Path, header: dict[str, Any], config_dir: Path) -> None:
    """The checkpoint's widths must be the config folder's, else its configs are another model's."""
    text = read_json(config_dir / "text_encoder" / "config.json")
    unet = read_json(config_dir / "unet" / "config.json")
    found = {
        "text encoder width": (header.get(_CLIP_EMBED, {}).get("shape", [0, None])[-1], text.get("hidden_size")),
        "first UNet block channels": (header.get(_UNET_CONV_IN, {}).get("shape", [None])[0], (unet.get("block_out_channels") or [None])[0]),
    }
    wrong = [f"{what} {got}, not {want}" for what, (got, want) in found.items() if got != want]
    if wrong:
        raise BackboneUnavailable(
            f"{path.name} is shaped unlike the configs in {config_dir} ({'; '.join(wrong)}): set "
            f"model.single_file_config to the diffusers config folder of its model."
        )


_CLIP_EMBED = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def single_file_config_dir(cfg: ModelConfig) -> Path:
    folder = Path(cfg.single_file_config).expanduser() if cfg.single_file_config else SD15_CONFIG_DIR
    if not folder.is_dir():
        raise BackboneUnavailable(f"model.single_file_config {str(folder)!r} is not a folder")
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not (folder / sub).is_dir():
            raise BackboneUnavailable(
                f"model.single_file_config {str(folder)!r} is not a diffusers config folder: missing {sub}/"
            )
    return folder


def resolve_model(cfg: ModelConfig) -> ModelFiles:
    """Find ``cfg.source`` and check it, reading configs and headers only (no weights, no torch)."""
    if cfg.is_tiny:
        return ModelFiles(source="tiny", layout="tiny")
    location = str(TOY_DIR) if cfg.source == "toy" else cfg.source
    refuse_pickles(location)
    path = Path(location).expanduser()
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise BackboneUnavailable(f"checkpoint file not found: {path}")
        header = safetensors_header(path)
        arch = checkpoint_architecture(path, header)
        half = any(v.get("dtype") == "F16" for k, v in header.items() if k.startswith("model.diffusion_model."))
        config_dir = single_file_config_dir(cfg)
        _check_checkpoint_shapes(path, header, config_dir)
        return ModelFiles(cfg.source, "single_file", path, config_dir, arch, half_precision=half)
    what = "the model source (a folder, a .safetensors file or a hub id)"
    folder = Path(local_or_hub_folder(location, cfg.revision, HUB_PATTERNS, what))
    arch = folder_architecture(folder)
    if not (folder / "tokenizer").is_dir():
        raise BackboneUnavailable(f"{folder} is not a Stable Diffusion 1.x diffusers folder: missing tokenizer/")
    found = {component: _find_weights(folder, component) for component in COMPONENTS}
    weights = {component: file for component, (file, _) in found.items()}
    variants = {component: variant for component, (_, variant) in found.items()}
    half = any(v in ("fp16", "bf16") for v in variants.values())
    return ModelFiles(cfg.source, "folder", folder, folder, arch, weights, variants, half)


# --------------------------------------------------------------------------- identity
def config_fingerprint(files: ModelFiles, image_encoder: Path | None, tiny_encoder: bool = False) -> dict[str, Any]:
    """The parts of Backbone.fingerprint() that configs tell: compared with a concept before loading."""
    if files.layout == "tiny":
        return {"token_dim": TINY_TEXT_WIDTH, "text_layers": TINY_TEXT_LAYERS, "vocab_size": 49408,
                "image_embed_dim": 32 if tiny_encoder else None}
    text = files.text_config()
    vision = read_json(image_encoder / "config.json") if image_encoder is not None else None
    return {
        "token_dim": text.get("hidden_size"),
        "text_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
        "image_embed_dim": None if vision is None else vision.get("projection_dim"),
    }


def tensor_digest(tensors: dict[str, Any]) -> str:
    """A short id of a model's weights from a few named tensors (torch tensors, cast to fp16 so the
    fp32 and fp16 copies of one model, in any layout, give the same id)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode() + str(tuple(value.shape)).encode())
        digest.update(value.flatten()[:4096].view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def check(cfg: ModelConfig) -> tuple[ModelFiles, Path | None]:
    """Every check that needs no weights, the bypass's image encoder first: (model files, encoder folder).

    When both the image encoder and the model are missing, one message says both."""
    if not cfg.is_tiny:
        refuse_pickles(cfg.source)
    try:
        encoder = image_encoder_folder(cfg.image_encoder)
    except BackboneUnavailable as first:
        try:
            resolve_model(cfg)
        except BackboneUnavailable as second:
            raise BackboneUnavailable(f"{first} Also: {second}", reason=first.reason) from None
        raise
    return resolve_model(cfg), encoder


def expected_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """What Backbone.fingerprint() will say about ``cfg``'s widths, from configs only."""
    files, encoder = check(cfg)
    return {"source": cfg.source, **config_fingerprint(files, encoder, tiny_encoder=cfg.image_encoder == "tiny")}


def concept_mismatch(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """The sentence when a concept trained on ``saved`` cannot run on a model with ``expected`` widths."""
    if saved.get("token_dim") == expected["token_dim"] and saved.get("vocab_size") == expected["vocab_size"]:
        return None
    return (
        f"This concept was trained on {saved.get('source', '?')} (width {saved.get('token_dim', '?')}), and the "
        f"configured model {expected['source']} has width {expected['token_dim']}: their text encoders differ, so "
        f"it cannot be used with it. Switch to the model it was trained on (--model or the preset)."
    )
