"""The full-size Stable Diffusion 1.5 architecture with random weights, built from configs.

Same shapes and FLOPs as the released model, no download: UNet (860 M), VAE, CLIP ViT-L/14
text encoder and a CLIP ViT-B/32 image encoder (the authors' bypass encoder). The configs are
written out in full because the library defaults are not SD 1.5 (diffusers 0.42: the default
UNet has ``cross_attention_dim=1280``, the default VAE one block, the default DDPM scheduler
``steps_offset=0``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessorPil as CLIPImageProcessor,  # PIL backend, as studio.backbone: no torchvision needed
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from studio.backbone import (
    SD15_SCHEDULER_CONFIG,
    Backbone,
    assemble_backbone,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

SOURCE = "sd15-random"

# unet/config.json of stable-diffusion-v1-5.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# vae/config.json of stable-diffusion-v1-5.
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# text_encoder/config.json of stable-diffusion-v1-5 (CLIP ViT-L/14 text tower).
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

# openai/clip-vit-base-patch32 vision tower with its 512-d projection.
VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _init_on(device: torch.device):
    """Initialise weights directly on ``device`` (random init of 1 B parameters is slow on CPU)."""
    if device.type == "cpu":
        yield
    else:
        with device:
            yield


def build_sd15_backbone(device: str = "auto", dtype: str = "auto", seed: int = 0) -> tuple[Backbone, dict[str, float]]:
    """A frozen SD 1.5-shaped :class:`Backbone` with random weights; also returns build seconds per part.

    Assembled like the studio's own backbones (``studio.backbone.assemble_backbone``): frozen,
    eval, moved to the resolved device/dtype, attention hooks installed.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer()
    seconds: dict[str, float] = {}
    parts: dict[str, torch.nn.Module] = {}
    with torch.random.fork_rng(devices=[]), _init_on(torch_device):
        torch.manual_seed(seed)
        builders = {
            "text_encoder": lambda: CLIPTextModel(
                CLIPTextConfig(
                    **TEXT_CONFIG,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            ),
            "unet": lambda: UNet2DConditionModel(**UNET_CONFIG),
            "vae": lambda: AutoencoderKL(**VAE_CONFIG),
            "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG)),
        }
        for name, build in builders.items():
            start = time.perf_counter()
            parts[name] = build()
            seconds[name] = time.perf_counter() - start
    parts.update(
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**SD15_SCHEDULER_CONFIG),
        # openai/clip-vit-base-patch32's preprocessor_config.json: 224 px, CLIP mean/std.
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    )
    return assemble_backbone(SOURCE, parts, torch_device, torch_dtype), seconds


def describe(backbone: Backbone) -> dict[str, Any]:
    """Parameter counts (millions) of the built parts, to check the sizes against SD 1.5."""
    return {
        name: round(count_parameters(getattr(backbone, name)) / 1e6, 1)
        for name in ("unet", "vae", "text_encoder", "image_encoder")
    }
