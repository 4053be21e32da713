"""Small random SD-1.x-shaped models written in every layout users have them in.

One set of weights (``studio.backbone.tiny_components``) saved as: a diffusers folder, an fp16
variant folder, a ``.bin``-only folder, a hub-cache snapshot, a single-file checkpoint in the
original LDM key layout, plus an SD2-shaped folder, an SDXL-shaped folder and a CLIP image
encoder folder. The LDM checkpoint is made by inverting the key maps of diffusers' conversion
script (convert_diffusers_to_original_stable_diffusion.py), generalised to any number of
blocks, and checked by converting it back with diffusers' own ``convert_ldm_*`` functions.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.backbone import SD15_SCHEDULER_CONFIG, TOKENIZER_DIR, seeded_init, tiny_components, tiny_image_processor

HUB_REPO = "someone/tiny-sd"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- diffusers -> LDM keys
def _unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for a UNet2DConditionModel config."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = []
    for i in range(n):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    return pairs


_UNET_DIRECT = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(state: dict, config: dict) -> dict:
    out = {}
    prefixes = _unet_prefix_map(config)
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_DIRECT.items():
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in new:
            for hf, sd in _RESNET:
                new = new.replace(f".{hf}.", f".{sd}.")
        for hf, sd in prefixes:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = []
    for i in range(n):
        for j in range(per):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(per + 1):
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        if i < n - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for side in ("encoder", "decoder"):
        for j in range(2):
            prefixes.append((f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}."))
        prefixes.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1."))
        prefixes.append((f"{side}.conv_norm_out.", f"{side}.norm_out."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut")
        for hf, sd in prefixes:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        if ".mid.attn_1." in new:
            for hf, sd in attn:
                new = new.replace(f".attn_1.{hf}", f".attn_1.{sd}")
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        out["first_stage_model." + new] = value
    return out


def ldm_checkpoint(parts: dict) -> dict:
    """The original single-file layout of ``parts``, verified against diffusers' converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
    )

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    checkpoint = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **{"cond_stage_model.transformer.text_model." + k: v for k, v in text.state_dict().items()},
    }
    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)),
    }
    for name, converted in back.items():
        original = parts[name].state_dict()
        assert set(converted) == set(original), (name, sorted(set(original) ^ set(converted))[:6])
        for key, value in original.items():
            assert torch.equal(converted[key].reshape(value.shape), value), (name, key)
    clip = convert_ldm_clip_checkpoint(checkpoint)
    assert {k.removeprefix("text_model.") for k in clip} == set(text.state_dict())
    return {k: v.contiguous() for k, v in checkpoint.items()}


# --------------------------------------------------------------------------- writers
def _model_index(**extra) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], **extra,
    }


def write_folder(parts: dict, folder: Path, variant: str | None = None, safe: bool = True,
                 scheduler: dict | None = None, index: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index or _model_index()))
    dtype = torch.float16 if variant == "fp16" else None
    for name in ("text_encoder", "unet", "vae"):
        module = parts[name]
        if dtype is not None:
            module = module.to(dtype)
        module.save_pretrained(folder / name, variant=variant, safe_serialization=safe)
        if dtype is not None:
            parts[name].to(torch.float32)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **(scheduler or SD15_SCHEDULER_CONFIG)})
    )
    shutil.copytree(TOKENIZER_DIR, folder / "tokenizer", dirs_exist_ok=True)
    return folder


def write_hub_cache(folder: Path, cache: Path, repo: str = HUB_REPO) -> Path:
    """A filled hub cache (HF_HUB_CACHE layout): models--owner--name/{refs/main, snapshots/<hash>/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    shutil.copytree(folder, root / "snapshots" / HUB_COMMIT)
    return cache


def sd2_parts(seed: int = 1) -> dict:
    """SD 2.x shape: linear projections in the UNet's transformers, a GELU (OpenCLIP-like) text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = tiny_components(seed)
    text_cfg = CLIPTextConfig(**{**parts["text_encoder"].config.to_dict(), "hidden_act": "gelu"})
    with seeded_init(seed):
        parts["text_encoder"] = CLIPTextModel(text_cfg)
        parts["unet"] = UNet2DConditionModel(**{**dict(parts["unet"].config), "use_linear_projection": True})
    return parts


def write_sdxl_folder(folder: Path) -> Path:
    """Configs of an SDXL-shaped pipeline (refused from its configs: no weights needed)."""
    folder.mkdir(parents=True)
    index = _model_index(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index))
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer"):
        (folder / sub).mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "cross_attention_dim": 2048,
        "in_channels": 4,
    }))
    return folder


def write_image_encoder(folder: Path, seed: int = 0) -> Path:
    parts = tiny_components(seed)
    parts["image_encoder"].save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    """Every layout under ``root``; returns name -> path (hub_cache is the cache folder)."""
    parts = tiny_components(7)
    paths = {"folder": write_folder(parts, root / "tiny-sd")}
    paths["fp16"] = write_folder(parts, root / "tiny-sd-fp16", variant="fp16")
    paths["bin"] = write_folder(parts, root / "tiny-sd-bin", safe=False)
    text_dir = paths["bin"] / "text_encoder"  # transformers 5 writes safetensors whatever it is told
    torch.save(parts["text_encoder"].state_dict(), text_dir / "pytorch_model.bin")
    (text_dir / "model.safetensors").unlink()
    paths["hub_cache"] = write_hub_cache(paths["folder"], root / "hub")
    paths["single_file"] = root / "tiny-sd.safetensors"
    save_file(ldm_checkpoint(parts), str(paths["single_file"]))
    paths["sd2"] = write_folder(sd2_parts(), root / "tiny-sd2", scheduler={**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    paths["sdxl"] = write_sdxl_folder(root / "tiny-sdxl")
    paths["image_encoder"] = write_image_encoder(root / "tiny-clip-vision")
    return paths
