"""Two yardsticks for the studio's training step, written from docs/ALGORITHM.md (not the authors' code).

* :class:`ReferenceRecipe` — the authors' released recipe as docs/ALGORITHM.md ("Mapper", "Losses" and the table of differences) describes it: fp32,
  attention without SDPA (diffusers' classic ``AttnProcessor`` maths in the UNet, transformers'
  ``"eager"`` attention in the text encoder), VAE latents and the CLIP image embedding
  recomputed every micro-step, the text encoder run separately for the reconstruction prompt
  and the Tandem-Equilibrium prompt, mapper + image bypass (zeroed with p = 0.5), masked MSE,
  batch 1 x gradient accumulation 2, plain (non-fused) AdamW.
* :class:`TextualInversionStep` — the floor: one learned token vector, no TE, no mask, no
  bypass, latents encoded once, the studio's own attention kernels and precision.

Neither mutates the shared backbone: the reference runs on its own eager text-encoder copy and
swaps the UNet's attention processors only for the duration of a step (restored in ``finally``);
on a backbone that is not fp32 it keeps fp32 copies of the modules it runs.
"""
from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from transformers import CLIPTextModel

from studio.backbone import Backbone
from studio.conditioning import encode_text, super_category_id, tokenize
from studio.mapper import IdentityMapper

# A few of the textual-inversion "imagenet templates" (reconstruction prompts) and of the
# scene / action prompts the TE term uses; which one is drawn does not change the cost.
RECONSTRUCTION_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
)
TE_PROMPTS = (
    "{} is reading a book in a quiet library",
    "{} is playing the guitar on a stage",
    "{} wearing a red hat standing on a beach at sunset",
    "{} as a chef cooking in a busy kitchen",
)


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, R, R) float32 in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: np.ndarray, latent_size: int) -> torch.Tensor:
    """(H, W) float mask in [0, 1] -> (1, 1, h, w) at latent resolution (area average)."""
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(tensor, latent_size)


# --------------------------------------------------------------------------- eager UNet attention
class EagerBypassAttnProcessor(AttnProcessor):
    """diffusers' classic (non-SDPA) attention; cross-attention values may come from ``value_states``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, value_states=None, **kwargs):
        if value_states is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape if hidden_states.ndim == 4 else (None,) * 4
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(value_states))
        probs = attn.get_attention_scores(query, key, None)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if batch is not None:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def eager_unet_attention(unet: torch.nn.Module) -> Iterator[None]:
    """Within this block the UNet uses :class:`EagerBypassAttnProcessor`; the old processors come back after."""
    saved = unet.attn_processors
    unet.set_attn_processor(EagerBypassAttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def eager_text_encoder(shared: CLIPTextModel, device: torch.device) -> CLIPTextModel:
    """An fp32 copy of the text encoder with transformers' eager attention and no studio hooks."""
    config = copy.deepcopy(shared.config)
    encoder = CLIPTextModel(config)
    encoder.load_state_dict(shared.state_dict())
    encoder.set_attn_implementation("eager")
    return encoder.requires_grad_(False).eval().to(device=device, dtype=torch.float32)


class _TokenInjector:
    """Forward hook on a token-embedding layer: rows at ``mask`` (B, L) become ``vectors`` (B, K, D)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.vectors: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        if self.mask is None:
            return output
        return output.masked_scatter(self.mask[..., None].expand_as(output), self.vectors.to(output.dtype))


def _fp32(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """``module`` itself when already fp32, else an fp32 copy (the recipe runs in fp32)."""
    if module is None or next(module.parameters()).dtype == torch.float32:
        return module
    return copy.deepcopy(module).float()


# --------------------------------------------------------------------------- losses (docs/ALGORITHM.md, "Losses")
def masked_mse(target: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ M (ε - ε̂)² / Σ M over (B, C, h, w); mask (B, 1, h, w)."""
    mask = mask.expand_as(target)
    return ((target.float() - prediction.float()) ** 2 * mask).sum() / mask.sum().clamp_min(1e-6)


def tandem_equilibrium(attention: torch.Tensor, input_ids: torch.Tensor, identity_mask: torch.Tensor,
                       eos_id: int, temperature: float = 100.0) -> torch.Tensor:
    """The authors' TE loss −ā(1−ā) over a batch; attention (B, H, L, L) last-layer probabilities."""
    losses = []
    for row in range(attention.shape[0]):
        end = int((input_ids[row] == eos_id).nonzero()[0])
        real = torch.arange(1, end, device=attention.device)  # word tokens between <bos> and <eos>
        probs = attention[row][:, real][:, :, real]  # (H, Q, K)
        received = probs.sum(dim=(0, 1))  # total attention each key receives
        is_identity = identity_mask[row, real].to(attention.device)
        s = int(torch.where(is_identity, received, torch.full_like(received, -1)).argmax())
        o = int(torch.where(~is_identity, received, torch.full_like(received, -1)).argmax())
        pair = torch.stack([probs[:, :, s], probs[:, :, o]], dim=-1)  # (H, Q, 2)
        mean = torch.softmax(temperature * pair, dim=-1)[..., 0].mean()
        losses.append(-mean * (1.0 - mean))
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------- the authors' recipe
@dataclass
class RecipeSettings:
    """Hyper-parameters of the released recipe (docs/ALGORITHM.md, "Losses")."""

    num_tokens: int = 4
    super_category: str = "face"
    band: tuple[int, int] = (400, 800)
    num_anchors: int = 200
    hidden_dim: int = 128
    time_encoding_dim: int = 2048
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    batch_size: int = 1
    grad_accum: int = 2
    bypass_dropout: float = 0.5
    te_weight: float = 1e-3
    te_temperature: float = 100.0
    resolution: int = 512
    seed: int = 0


class ReferenceRecipe:
    """The authors' training recipe on the given backbone (fp32 copies where it is not fp32).

    ``micro_step()`` is one forward + backward of ``batch_size`` samples; ``step()`` is one
    optimiser step = ``grad_accum`` micro-steps + AdamW.
    """

    def __init__(self, backbone: Backbone, image: Image.Image, mask: np.ndarray, settings: RecipeSettings | None = None) -> None:
        self.settings = s = settings or RecipeSettings()
        self.backbone, self.device = backbone, backbone.device
        self.unet, self.vae = _fp32(backbone.unet), _fp32(backbone.vae)
        self.image_encoder = _fp32(backbone.image_encoder)
        self.text_encoder = eager_text_encoder(backbone.text_encoder, self.device)
        self.injector = _TokenInjector()
        self.text_encoder.get_input_embeddings().register_forward_hook(self.injector)
        self.tokenizer = backbone.tokenizer
        self.slot_id = super_category_id(self.tokenizer, s.super_category)
        class_embedding = self.text_encoder.get_input_embeddings().weight[self.slot_id].detach()
        image_dim = backbone.image_embed_dim
        torch.manual_seed(s.seed)
        self.mapper = IdentityMapper(
            class_embedding, s.num_tokens, s.band, s.num_anchors, s.hidden_dim, s.time_encoding_dim, image_dim
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.mapper.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        self.photo = image.convert("RGB")
        self.pixels = image_to_tensor(self.photo, s.resolution)  # kept on the host, like a data loader's output
        self.mask = mask_to_tensor(mask, s.resolution // backbone.vae_scale_factor)
        self.rng = random.Random(s.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        self.losses: list[float] = []  # mean loss per optimiser step

    # ---- the per-step work the recipe does every micro-step
    def _latents(self, batch: int) -> torch.Tensor:
        pixels = self.pixels.expand(batch, -1, -1, -1).to(self.device)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.sample(generator=self.generator) * self.vae.config.scaling_factor

    def _image_embedding(self, batch: int) -> torch.Tensor | None:
        if self.image_encoder is None:
            return None
        inputs = self.backbone.image_processor(images=[self.photo] * batch, return_tensors="pt")
        return self.image_encoder(pixel_values=inputs.pixel_values.to(self.device)).image_embeds

    def _encode(self, prompts: list[str], identity: torch.Tensor, bypass: torch.Tensor | None, capture: bool):
        ids, mask = tokenize(self.tokenizer, prompts, self.settings.num_tokens, self.slot_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.injector.mask, self.injector.vectors = mask, identity
        try:
            out = self.text_encoder(
                input_ids=ids, output_hidden_states=bypass is not None, output_attentions=capture
            )
        finally:
            self.injector.mask = self.injector.vectors = None
        hidden, values = out.last_hidden_state, None
        if bypass is not None:
            pre_norm = out.hidden_states[-1]
            residual = torch.zeros_like(pre_norm).masked_scatter(mask[..., None].expand_as(pre_norm), bypass)
            moved = pre_norm.norm(dim=-1, keepdim=True) * F.normalize(pre_norm + residual, dim=-1)
            values = self.text_encoder.final_layer_norm(torch.where(mask[..., None], moved, pre_norm))
        attention = out.attentions[-1] if capture else None
        return hidden, values, attention, ids, mask

    def micro_step(self) -> float:
        """One forward + backward of ``batch_size`` samples (loss scaled for accumulation)."""
        s, batch = self.settings, self.settings.batch_size
        with eager_unet_attention(self.unet):
            latents = self._latents(batch)
            image_embedding = self._image_embedding(batch)
            t = torch.randint(s.band[0], s.band[1], (batch,), device=self.device, generator=self.generator)
            noise = torch.randn(latents.shape, device=self.device, generator=self.generator)
            noisy = self.backbone.noise_scheduler.add_noise(latents, noise, t)
            identity = self.mapper(t)
            bypass = None
            if image_embedding is not None:
                keep = (torch.rand(batch, device=self.device, generator=self.generator) >= s.bypass_dropout).float()
                bypass = self.mapper.bypass_vectors(t, image_embedding) * keep[:, None, None]
            prompts = [self.rng.choice(RECONSTRUCTION_TEMPLATES).format("{}") for _ in range(batch)]
            hidden, values, _, _, _ = self._encode(prompts, identity, bypass, capture=False)
            kwargs = {"value_states": values} if values is not None else None
            prediction = self.unet(noisy, t, hidden, cross_attention_kwargs=kwargs).sample
            rec = masked_mse(noise, prediction, self.mask.to(self.device).expand(batch, -1, -1, -1))
            te_prompts = [self.rng.choice(TE_PROMPTS) for _ in range(batch)]
            _, _, attention, ids, mask = self._encode(te_prompts, identity, None, capture=True)
            te = tandem_equilibrium(attention, ids, mask, self.tokenizer.eos_token_id, s.te_temperature)
            loss = rec + s.te_weight * te
            (loss / s.grad_accum).backward()
        return float(loss.detach())

    def step(self) -> float:
        """One optimiser step: ``grad_accum`` micro-steps then AdamW; returns the mean loss."""
        losses = [self.micro_step() for _ in range(self.settings.grad_accum)]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(sum(losses) / len(losses))
        return self.losses[-1]


# --------------------------------------------------------------------------- the floor
class TextualInversionStep:
    """Plain textual inversion: one token vector, ε-MSE, no TE / mask / bypass (the floor).

    Uses the studio's text-encoder path and kernels, latents encoded once, and autocast to the
    backbone's dtype on accelerators, so it does the least work any identity training can do.
    """

    def __init__(self, backbone: Backbone, image: Image.Image, resolution: int, batch_size: int = 1,
                 lr: float = 5e-3, seed: int = 0, prompt: str = "a photo of {}") -> None:
        self.backbone, self.device, self.batch_size = backbone, backbone.device, batch_size
        slot_id = super_category_id(backbone.tokenizer, "face")
        self.ids, self.mask = tokenize(backbone.tokenizer, [prompt] * batch_size, 1, slot_id)
        embedding = backbone.text_encoder.get_input_embeddings().weight[slot_id].detach().float().clone()
        self.vector = torch.nn.Parameter(embedding.to(self.device))
        self.optimizer = torch.optim.AdamW([self.vector], lr=lr)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.autocast = torch.autocast(self.device.type, dtype=backbone.dtype, enabled=backbone.dtype != torch.float32)
        with torch.no_grad():
            pixels = image_to_tensor(image, resolution).to(self.device, backbone.dtype)
            latents = backbone.vae.encode(pixels).latent_dist.sample(generator=self.generator)
        self.latents = (latents * backbone.vae.config.scaling_factor).expand(batch_size, -1, -1, -1)

    def step(self) -> float:
        backbone, batch = self.backbone, self.batch_size
        t = torch.randint(0, backbone.noise_scheduler.config.num_train_timesteps, (batch,), device=self.device, generator=self.generator)
        noise = torch.randn(self.latents.shape, device=self.device, generator=self.generator, dtype=self.latents.dtype)
        noisy = backbone.noise_scheduler.add_noise(self.latents, noise, t)
        with self.autocast:
            identity = self.vector.expand(batch, 1, -1)
            states = encode_text(backbone, self.ids, self.mask, identity=identity)
            prediction = backbone.unet(noisy, t, states.hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
