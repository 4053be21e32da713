"""``python -m studio toy pretrain --out DIR``: build the toy backbone and its instruments.

Stages (each resumable, each skipped when its output exists; docs/TOY.md):

1. ``data``: render the training set (identities 0..N-1 of the pretraining range, several
   random scenes each, with labels and landmarks), a held-out set of unseen identities
   (from 100 000 up) and face-free negatives, into ``DIR/data/*.npz``.
2. ``instruments``: the face locator, the identity encoder, the attribute classifier and
   the CLIP-shaped image encoder of the bypass, trained on renders.
3. ``backbone``: the VAE, then the UNet and the CLIP text encoder together (ε-prediction on
   SD's noise schedule, captions from templates, 10 % empty captions for guidance), written
   as a diffusers folder with the shipped CLIP tokenizer.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.toy import models as toy_models
from studio.toy.world import (
    ATTRIBUTES,
    CLASS_WORDS,
    FIRST_UNSEEN_IDENTITY,
    Identity,
    Scene,
    caption,
    random_scene,
    render,
    render_background,
)

STAGES = ("data", "instruments", "backbone", "decoder")


@dataclass(frozen=True)
class PretrainPlan:
    """Sizes of the pretraining run (defaults fit a 2-core CPU in about an hour)."""

    identities: int = 6000
    views: int = 4
    heldout_identities: int = 400
    negatives: int = 3000
    # each of the face locator, identity encoder and attribute classifiers (the shipped locator had 500)
    instrument_steps: int = 4000
    vision_steps: int = 400
    vae_steps: int = 250
    unet_minutes: float = 55.0
    # also stop the UNet stage at this step: unlike the time budget, the same on any machine (a run that is
    # stopped and resumed on the way draws other batches after the resume than one that is not)
    unet_steps: int | None = None
    unet_batch: int = 64
    # share of the captions whose class word carries an identity (IdentityTokens); 0 = off
    identity_token_share: float = 0.0
    # Min-SNR-gamma loss weighting (Hang et al., 2023): each sample's epsilon loss is weighted by
    # min(SNR(t), gamma) / SNR(t), so the easy, nearly clean steps stop dominating the gradient; None = off
    min_snr_gamma: float | None = None
    # decay the learning rate along a cosine to a tenth, from the step this is first switched on to
    # unet_steps (which it needs); off = the constant rate after warm-up
    anneal: bool = False
    # extra weight of the latent pixels at the eyes and the mouth in the UNet's epsilon loss (the
    # decoder's Gaussians, at the latent's scale); 0 = every latent pixel alike
    unet_feature_weight: float = 0.0
    # width of the UNet's attention heads (see unet_config); None = the first runs' 32 heads per
    # layer. A run records what it was built with, and resuming or exporting it keeps that
    unet_head_width: int | None = None
    # cross-attention at the 16 x 16 latent level too, as SD 1.x has at its finest level (see
    # unet_config); a run continued from a folder without it adds the layers as exact no-ops
    unet_fine_attention: bool = False
    decoder_minutes: float = 20.0
    decoder_batch: int = 32
    # rounds of decoder fine-tuning the VAE should have had: the decoder stage runs one more while it
    # has had fewer (a folder continued from, e.g. assets/toy, brings its rounds along)
    decoder_rounds: int = 1
    # extra weight of the pixels at the eyes and the mouth in the decoder's loss (a Gaussian of
    # FEATURE_SIGMA_PX around each of the render's landmarks there); 0 = every pixel alike
    decoder_feature_weight: float = 0.0
    # Gaussian noise added to the latents the decoder learns from, up to this fraction of their std
    # (drawn per image, uniformly): the UNet's latents are off the encoder's distribution, and a
    # sharp decoder that never saw such latents draws their fine noise as a grid; 0 = none
    decoder_latent_noise: float = 0.0
    seed: int = 0
    device: str = "cpu"  # where the UNet + text encoder stage runs ("cuda" on a lent GPU)
    # a toy diffusers folder (e.g. assets/toy) whose weights a new run's UNet stage starts from
    continue_from: str | None = None

    def __post_init__(self) -> None:
        if self.anneal and self.unet_steps is None:
            raise ValueError("anneal decays the learning rate towards unet_steps: set unet_steps too")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """One stderr line every few seconds: step, rate and ETA."""

    def __init__(self, name: str, total: int | None = None, deadline: float | None = None) -> None:
        self.name, self.total, self.deadline = name, total, deadline
        self.start = self.last = time.time()
        self.first_step: int | None = None  # a resumed stage's steps count from where it went on

    def update(self, step: int, **values: float) -> None:
        now = time.time()
        if self.first_step is None:
            self.first_step = step - 1
        if now - self.last < 10 and step != self.total:
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.start, 1e-6)
        if self.total:
            eta = (self.total - step) / max(rate, 1e-9)
        else:
            eta = max(0.0, (self.deadline or now) - now)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        _log(f"[{self.name}] step {step}{'/' + str(self.total) if self.total else ''} · {rate:.2f} steps/s · ETA {eta / 60:.1f} min · {shown}")


# --------------------------------------------------------------------------- stage 1: data
def _render_chunk(args: tuple[list[int], int, int]) -> dict[str, np.ndarray]:
    numbers, views, seed = args
    images, ids, attrs, marks = [], [], [], []
    for number in numbers:
        ident = Identity.from_number(number)
        rng = np.random.default_rng([number, seed, 3])
        for v in range(views):
            scene = random_scene(rng)
            img, lm = render(ident, scene, seed=seed * 1000 + v, with_landmarks=True)
            images.append(np.asarray(img))
            ids.append(number)
            attrs.append([list(ATTRIBUTES[a]).index(getattr(scene, a)) for a in ATTRIBUTES])
            marks.append(lm.as_array())
    return dict(images=np.stack(images), identity=np.array(ids, np.int64), attributes=np.array(attrs, np.int64),
                landmarks=np.stack(marks))


def _render_set(numbers: list[int], views: int, seed: int, workers: int) -> dict[str, np.ndarray]:
    chunks = [(numbers[i : i + 100], views, seed) for i in range(0, len(numbers), 100)]
    with get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _render_negatives(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    return np.stack([np.asarray(render_background(random_scene(rng, jitter=False), seed=i)) for i in range(count)])


def stage_data(out: Path, plan: PretrainPlan, workers: int = 2) -> None:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "train.npz").exists():
        t = time.time()
        train = _render_set(list(range(plan.identities)), plan.views, plan.seed, workers)
        np.savez(data / "train.npz", **train)
        _log(f"[data] {len(train['images'])} training renders in {time.time() - t:.0f} s")
    if not (data / "heldout.npz").exists():
        heldout = _render_set(list(range(FIRST_UNSEEN_IDENTITY, FIRST_UNSEEN_IDENTITY + plan.heldout_identities)),
                              plan.views, plan.seed + 1, workers)
        np.savez(data / "heldout.npz", **heldout)
    if not (data / "negatives.npz").exists():
        np.savez(data / "negatives.npz", images=_render_negatives(plan.negatives, plan.seed))


def load_set(out: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(out / "data" / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------- augmentation
def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur, noise and colour shifts on (N, 3, H, W) in [-1, 1]: generated images are
    blurrier and noisier than renders, and the instruments must still read them."""
    n = x.shape[0]
    blur = torch.rand(n, generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3), x)
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.12)
    x = x * (1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.2) + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.15
    return x.clamp(-1, 1)


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, step: float, total: float, floor: float = 0.0) -> None:
    """One optimiser step, then the learning rate of the next: cosine from ``lr`` down to ``floor * lr``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


def aligned_crops(images: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, jitter: float = 0.0) -> np.ndarray:
    """uint8 (N, 64, 64, 3) crops aligned on the eyes (+ Gaussian landmark jitter in pixels)."""
    out = np.empty((len(images), toy_models.CROP_SIZE, toy_models.CROP_SIZE, 3), np.uint8)
    for i, (img, lm) in enumerate(zip(images, landmarks)):
        noise = rng.normal(0, jitter, (2, 2)) if jitter else 0
        eyes = lm[:2] + noise
        out[i] = toy_models.aligned_crop(img, eyes[0], eyes[1])
    return out


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss of unit embeddings z (N, D) with integer labels (N,)."""
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob * positives).sum(1).div(positives.sum(1).clamp(min=1)).mean()


def _identity_batch(ids: np.ndarray, per_identity: int, people: int, rng: np.random.Generator,
                    views: int) -> np.ndarray:
    """Indices of ``people`` identities × ``per_identity`` of their views (data is identity-major)."""
    chosen = rng.choice(len(ids) // views, size=people, replace=False)
    picks = [c * views + rng.choice(views, size=per_identity, replace=False) for c in chosen]
    return np.concatenate(picks)


def verification(embed: callable, heldout: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    """Same-vs-different verification on held-out identities: best-threshold accuracy, the
    threshold (Euclidean distance of unit vectors), and the mean distances."""
    crops = aligned_crops(heldout["images"], heldout["landmarks"], rng)
    z = embed(crops)
    ids = heldout["identity"]
    d = torch.cdist(z, z).numpy()
    same = ids[:, None] == ids[None, :]
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    d_same, d_diff = d[same & upper], d[~same & upper]
    rng_diff = rng.choice(d_diff, size=min(len(d_diff), len(d_same) * 4), replace=False)
    thresholds = np.linspace(0, 2, 401)
    acc = [((d_same < t).mean() + (rng_diff >= t).mean()) / 2 for t in thresholds]
    best = int(np.argmax(acc))
    return {"verification_accuracy": float(acc[best]), "threshold": float(thresholds[best]),
            "mean_same_distance": float(d_same.mean()), "mean_different_distance": float(d_diff.mean()),
            "pairs_same": int(len(d_same)), "pairs_different": int(len(d_diff))}


# --------------------------------------------------------------------------- stage 2: instruments
def _train_locator(train: dict, negatives: np.ndarray, plan: PretrainPlan, gen: torch.Generator,
                   rng: np.random.Generator) -> toy_models.FaceLocator:
    model = toy_models.FaceLocator()
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    progress = Progress("locator", plan.instrument_steps)
    n = len(train["images"])
    for step in range(1, plan.instrument_steps + 1):
        idx = rng.integers(0, n, 64)
        neg = rng.integers(0, len(negatives), 16)
        x = degrade(toy_models.to_input(np.concatenate([train["images"][idx], negatives[neg]])), gen)
        target = torch.as_tensor(train["landmarks"][idx] / 64.0)
        points, logit = model(x)
        present = torch.cat([torch.ones(64), torch.zeros(16)])
        loss = F.smooth_l1_loss(points[:64], target, beta=0.02) * 10 + F.binary_cross_entropy_with_logits(logit, present)
        _optimise(opt, loss, 2e-3, step, plan.instrument_steps)
        progress.update(step, loss=loss.item())
    return model.eval()


def _train_identity(train: dict, plan: PretrainPlan, gen: torch.Generator, rng: np.random.Generator,
                    steps: int, model: torch.nn.Module, embed_fn: callable, name: str) -> torch.nn.Module:
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    progress = Progress(name, steps)
    for step in range(1, steps + 1):
        idx = _identity_batch(train["identity"], 2, 48, rng, plan.views)
        crops = aligned_crops(train["images"][idx], train["landmarks"][idx], rng, jitter=0.8)
        x = degrade(toy_models.to_input(crops), gen)
        z = embed_fn(model, x)
        loss = supcon_loss(z, torch.as_tensor(train["identity"][idx]))
        _optimise(opt, loss, 1e-3, step, steps)
        progress.update(step, loss=loss.item())
    return model.eval()


def _train_attributes(train: dict, plan: PretrainPlan, gen: torch.Generator, rng: np.random.Generator) -> toy_models.AttributeClassifier:
    model = toy_models.AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    progress = Progress("attributes", plan.instrument_steps)
    n = len(train["images"])
    labels = torch.as_tensor(train["attributes"])
    for step in range(1, plan.instrument_steps + 1):
        idx = rng.integers(0, n, 96)
        x = degrade(toy_models.to_input(train["images"][idx]), gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], labels[idx, k]) for k, a in enumerate(toy_models.ATTRIBUTE_NAMES))
        _optimise(opt, loss, 2e-3, step, plan.instrument_steps)
        progress.update(step, loss=loss.item())
    return model.eval()


def vision_config() -> dict:
    return dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                image_size=64, patch_size=8, projection_dim=128)


def vision_embed(model, x: torch.Tensor) -> torch.Tensor:
    # CLIP normalisation: the processor maps [0, 1] pixels with CLIP's mean/std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    pixels = ((x + 1) / 2 - mean) / std
    return F.normalize(model(pixel_values=pixels).image_embeds, dim=-1)


def stage_instruments(out: Path, plan: PretrainPlan) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    inst = out / "instruments"
    inst.mkdir(parents=True, exist_ok=True)
    train, heldout = load_set(out, "train"), load_set(out, "heldout")
    negatives = load_set(out, "negatives")["images"]
    credentials = json.loads((inst / "credentials.json").read_text()) if (inst / "credentials.json").exists() else {}

    def streams() -> tuple[torch.Generator, np.random.Generator]:
        """Fresh random streams for each instrument: what one draws does not depend on which
        others were trained before it in this run (one already in the folder is skipped)."""
        return torch.Generator().manual_seed(plan.seed), np.random.default_rng(plan.seed)

    if not (inst / "locator.safetensors").exists():
        gen, rng = streams()
        torch.manual_seed(plan.seed)
        locator = _train_locator(train, negatives, plan, gen, rng)
        with torch.no_grad():
            pts, logit = locator(toy_models.to_input(heldout["images"]))
            neg_logit = locator(toy_models.to_input(negatives[:500]))[1]
        err = (pts * 64 - torch.as_tensor(heldout["landmarks"])).norm(dim=-1)
        credentials["locator"] = {
            "heldout_mean_landmark_error_px": float(err.mean()),
            "heldout_eye_error_px_p95": float(err[:, :2].flatten().quantile(0.95)),
            "face_detected_rate": float((logit > 0).float().mean()),
            "false_face_rate_on_empty_scenes": float((neg_logit > 0).float().mean()),
            "steps": plan.instrument_steps,
        }
        save_file(locator.state_dict(), str(inst / "locator.safetensors"))
        (inst / "credentials.json").write_text(json.dumps(credentials, indent=2))
        _log(f"[locator] {credentials['locator']}")

    if not (inst / "identity.safetensors").exists():
        gen, rng = streams()
        torch.manual_seed(plan.seed + 1)
        encoder = _train_identity(train, plan, gen, rng, plan.instrument_steps, toy_models.IdentityEncoder(),
                                  lambda m, x: m(x), "identity")
        with torch.no_grad():
            credentials["identity"] = verification(lambda c: encoder(toy_models.to_input(c)), heldout, rng)
        credentials["identity"]["steps"] = plan.instrument_steps
        save_file(encoder.state_dict(), str(inst / "identity.safetensors"))
        (inst / "credentials.json").write_text(json.dumps(credentials, indent=2))
        _log(f"[identity] {credentials['identity']}")

    if not (inst / "attributes.safetensors").exists():
        gen, rng = streams()
        torch.manual_seed(plan.seed + 2)
        clf = _train_attributes(train, plan, gen, rng)
        with torch.no_grad():
            logits = clf(toy_models.to_input(heldout["images"]))
        credentials["attributes"] = {
            a: float((logits[a].argmax(-1) == torch.as_tensor(heldout["attributes"][:, k])).float().mean())
            for k, a in enumerate(toy_models.ATTRIBUTE_NAMES)
        }
        credentials["attribute_steps"] = plan.instrument_steps
        save_file(clf.state_dict(), str(inst / "attributes.safetensors"))
        (inst / "credentials.json").write_text(json.dumps(credentials, indent=2))
        _log(f"[attributes] held-out accuracy {credentials['attributes']}")

    enc_dir = out / "image_encoder"
    if not (enc_dir / "model.safetensors").exists():
        gen, rng = streams()
        torch.manual_seed(plan.seed + 3)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config()))
        vision = _train_identity(train, plan, gen, rng, plan.vision_steps, vision, vision_embed, "image-encoder")
        with torch.no_grad():
            credentials["image_encoder"] = verification(lambda c: vision_embed(vision, toy_models.to_input(c)), heldout, rng)
        credentials["image_encoder"]["steps"] = plan.vision_steps
        vision.save_pretrained(str(enc_dir), safe_serialization=True)
        CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(str(enc_dir))
        (inst / "credentials.json").write_text(json.dumps(credentials, indent=2))
        _log(f"[image-encoder] {credentials['image_encoder']}")


# --------------------------------------------------------------------------- stage 3: backbone
def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                block_out_channels=(32, 64, 64), norm_num_groups=32, mid_block_add_attention=False,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


UNET_CHANNELS = (32, 64, 128)


FINE_HEAD_WIDTH = 8  # the 16 x 16 level's heads unless head_width says otherwise: 4 heads at 32 channels


def unet_config(cross_dim: int, head_width: int | None = None, fine_attention: bool = False) -> dict:
    """The toy UNet's diffusers config. diffusers reads ``attention_head_dim`` as the number of
    heads (a naming quirk it keeps for old checkpoints), so the first toy UNets, built with 32,
    have 32 heads of width 2 and 4 in every attention layer. ``head_width`` (e.g. 32) gives
    each block channels / head_width heads of that width instead (docs/TOY.md, "Attention heads");
    the parameters are the same either way. ``fine_attention`` puts cross-attention at the
    16 x 16 latent level as well (docs/TOY.md, "Attention at the finest level"): the first toy
    UNets condition on the prompt at 8 x 8 and 4 x 4 only."""
    heads: int | tuple[int, ...]
    if head_width is not None:
        heads = tuple(max(1, c // head_width) for c in UNET_CHANNELS)
    else:
        heads = (UNET_CHANNELS[0] // FINE_HEAD_WIDTH, 32, 32) if fine_attention else 32
    first, last = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if fine_attention else ("DownBlock2D", "UpBlock2D")
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=UNET_CHANNELS, norm_num_groups=32,
                down_block_types=(first, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last),
                cross_attention_dim=cross_dim, attention_head_dim=heads)


def has_fine_attention(unet_folder: Path) -> bool:
    """Whether a saved toy UNet (its diffusers folder) has cross-attention at the 16 x 16 level."""
    return json.loads((unet_folder / "config.json").read_text())["down_block_types"][0] == "CrossAttnDownBlock2D"


def load_unet_weights(unet, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load ``weights`` into ``unet``; the fine level's attention layers, where ``unet`` has them
    and the weights do not, start as exact no-ops (their output projection zero, so each block
    adds nothing to its residual stream) and train from there. Returns the layers so added."""
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    added = sorted({".".join(key.split(".")[:4]) for key in missing})  # e.g. "down_blocks.0.attentions.0"
    fine = ("down_blocks.0.attentions.", "up_blocks.2.attentions.")
    if unexpected or any(not key.startswith(fine) for key in missing):
        raise ValueError(f"the UNet weights do not fit this toy UNet: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name in added:
            out = unet.get_submodule(name).proj_out
            out.weight.zero_()
            out.bias.zero_()
    return added


def text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, projection_dim=128)


def _pixel_loss(recon: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruction loss of the VAE stages: MSE + 0.5 L1 on (B, 3, H, W) images in [-1, 1];
    with per-pixel ``weights`` (B, 1, H, W), their weighted mean (divided by the mean weight, so
    that weights of 1 give the plain loss)."""
    if weights is None:
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
    return (((recon - x) ** 2 + 0.5 * (recon - x).abs()) * weights).mean() / weights.mean()


def _train_vae(train: dict, plan: PretrainPlan, vae_dir: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(plan.seed + 4)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), 1e-3, weight_decay=0)
    rng = np.random.default_rng(plan.seed + 4)
    progress = Progress("vae", plan.vae_steps)
    n = len(train["images"])
    for step in range(1, plan.vae_steps + 1):
        x = toy_models.to_input(train["images"][rng.integers(0, n, 12)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = _pixel_loss(recon, x) + 1e-4 * kl
        _optimise(opt, loss, 1e-3, step, plan.vae_steps, floor=0.1)
        progress.update(step, loss=loss.item())
    vae.eval()
    center_latent_space(vae, train["images"][:2048])
    with torch.no_grad():
        sample = toy_models.to_input(train["images"][:512])
        z = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, 512, 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(str(vae_dir), safe_serialization=True)


FEATURE_SIGMA_PX = 3.0
DECODER_LR = 5e-4  # the first round; later rounds fine-tune a fine-tuned decoder, more gently
LATER_DECODER_LR = 2e-4


def feature_weights(landmarks: np.ndarray, weight: float, side: int, image_side: int = 64) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, side, side): 1, plus ``weight`` times a Gaussian of
    FEATURE_SIGMA_PX at each eye and the mouth of each render's landmarks (B, 5, 2), given in the
    pixels of an ``image_side`` render; a smaller ``side`` (a latent's) scales centres and
    Gaussians with it, so that centres are taken at pixel centres ((x + 0.5) side / image_side - 0.5)."""
    scale = side / image_side
    centres = torch.from_numpy(landmarks[:, [0, 1, 3]].astype(np.float32))  # (B, 3, 2): eyes, mouth as (x, y)
    centres = (centres + 0.5) * scale - 0.5
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    d2 = (xs - centres[..., 0, None, None]) ** 2 + (ys - centres[..., 1, None, None]) ** 2  # (B, 3, side, side)
    return 1 + weight * torch.exp(-d2 / (2 * (FEATURE_SIGMA_PX * scale) ** 2)).sum(1, keepdim=True)


def decoder_rounds(record: Path) -> list[dict[str, Any]]:
    """The fine-tuning rounds ``vae/decoder.json`` records (a file from before rounds were
    recorded describes one)."""
    if not record.exists():
        return []
    data = json.loads(record.read_text())
    return data["rounds"] if "rounds" in data else [data]


def stage_decoder(out: Path, plan: PretrainPlan) -> None:
    """Fine-tune the VAE's decoder with its encoder frozen (as SD's ft-MSE VAE was): the latent
    space the UNet learned stays exactly the same, and every generated latent decodes sharper.
    The short VAE stage reconstructs colours and edges poorly, which caps what any sample can
    look like. Posterior samples (not means) are decoded, so that imperfect latents from the
    UNet decode well too. Runs one round while ``vae/decoder.json`` records fewer than
    ``plan.decoder_rounds``; a run continued from a folder starts from the folder's VAE."""
    from diffusers import AutoencoderKL

    vae_dir, record = out / "vae", out / "vae" / "decoder.json"
    if plan.continue_from and not (vae_dir / "diffusion_pytorch_model.safetensors").exists():
        take_folder_latent_space(out, Path(plan.continue_from))
    rounds = decoder_rounds(record)
    if len(rounds) >= plan.decoder_rounds:
        _log(f"[decoder] already fine-tuned in {len(rounds)} round(s) ({record})")
        return
    train = load_set(out, "train")
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())  # the encoder stays as it is
    lr = DECODER_LR if not rounds else LATER_DECODER_LR
    opt = torch.optim.AdamW(params, lr, weight_decay=0)
    rng = np.random.default_rng([plan.seed + 8, len(rounds)])
    noise_gen = torch.Generator().manual_seed(plan.seed + 9 + len(rounds))
    n, budget, started = len(train["images"]), plan.decoder_minutes * 60, time.time()
    progress = Progress(f"decoder, round {len(rounds) + 1}", None, deadline=started + budget)
    step = 0
    while (elapsed := time.time() - started) < budget:
        step += 1
        idx = rng.integers(0, n, plan.decoder_batch)
        x = toy_models.to_input(train["images"][idx])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
            if plan.decoder_latent_noise:
                spread = torch.rand(len(z), 1, 1, 1, generator=noise_gen) * plan.decoder_latent_noise * z.std()
                z = z + spread * torch.randn(z.shape, generator=noise_gen)
        recon = vae.decode(z).sample
        weights = (feature_weights(train["landmarks"][idx], plan.decoder_feature_weight, x.shape[-1])
                   if plan.decoder_feature_weight else None)
        loss = _pixel_loss(recon, x, weights)
        _optimise(opt, loss, lr, elapsed, budget, floor=0.1)  # cosine over the time budget
        progress.update(step, loss=loss.item())
    vae.save_pretrained(str(vae_dir), safe_serialization=True)
    rounds.append({"steps": step, "batch": plan.decoder_batch, "minutes": (time.time() - started) / 60,
                   "final_loss": loss.item(), "learning_rate": lr, "feature_weight": plan.decoder_feature_weight,
                   "latent_noise": plan.decoder_latent_noise})
    record.write_text(json.dumps({"rounds": rounds}, indent=2))


def _to_cpu(value: Any) -> Any:
    """``value`` (nested dicts / lists of tensors, e.g. an optimizer state) with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _encode_all(vae, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Latent means (N, 4, 16, 16) of all ``images``, on the CPU (encoded on ``device``)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = toy_models.to_input(images[i : i + 256]).to(device)
            out.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def _write_folder_files(out: Path) -> None:
    from studio.backbone import SD15_SCHEDULER_CONFIG, TOKENIZER_DIR

    tok = out / "tokenizer"
    if not tok.exists():
        shutil.copytree(TOKENIZER_DIR, tok)
    sched = out / "scheduler"
    sched.mkdir(exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **SD15_SCHEDULER_CONFIG}, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }, indent=2))


def saved_projection(ckpt: Path, step: int) -> dict[str, torch.Tensor] | None:
    """W of :class:`IdentityTokens` as saved in checkpoint ``ckpt`` at ``step``; None when there is
    none, or when it was left there by an earlier stretch (the file says the step it was saved at)."""
    path = ckpt / "identity_tokens.safetensors"
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("step") != str(step):
            return None
    return load_file(str(path))


class IdentityTokens:
    """Identity-bearing class words for the UNet stage (docs/TOY.md, "Identity tokens").

    In a share of the captions, the class word's input embedding (D,) gets ``W e`` added: e (E,)
    the frozen bypass image encoder's embedding of *another* render of the same identity, W (D, E)
    learned from zero. The model so learns, as SD did from the people its captions name, that a
    token can carry a face, without any caption naming the face's features. W is a pretraining
    device only: it is checkpointed for resuming, never exported.
    """

    def __init__(self, out: Path, plan: PretrainPlan, train: dict, tokenizer, width: int, device: torch.device) -> None:
        from transformers import CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(str(out / "image_encoder")).eval()
        with torch.no_grad():
            self.embeddings = torch.cat([vision_embed(encoder, toy_models.to_input(train["images"][i : i + 256]))
                                         for i in range(0, len(train["images"]), 256)])  # (N, E) on the CPU
        by_identity: dict[int, list[int]] = {}
        for index, number in enumerate(train["identity"].tolist()):
            by_identity.setdefault(number, []).append(index)
        self.views = [by_identity[number] for number in train["identity"].tolist()]
        self.class_ids = torch.tensor([tokenizer(w, add_special_tokens=False).input_ids[0] for w in CLASS_WORDS])
        self.share, self.device = plan.identity_token_share, device
        self.projection = torch.nn.Linear(self.embeddings.shape[1], width, bias=False)
        torch.nn.init.zeros_(self.projection.weight)
        self.projection.to(device)
        self.opt = torch.optim.AdamW(self.projection.parameters(), 3e-4, weight_decay=0)
        self.pending: torch.Tensor | None = None  # (B, L, D) added to the next text-encoder input embeddings

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the text encoder's token embedding: adds (and consumes) the pending residual."""
        residual, self.pending = self.pending, None
        return output if residual is None else output + residual

    def prepare(self, ids: torch.Tensor, idx: np.ndarray, rng: np.random.Generator) -> None:
        """Set the residual for the batch ``ids`` (B, L) of training samples ``idx``."""
        ids = ids.cpu()
        is_class = torch.isin(ids, self.class_ids)
        rows = [b for b in range(len(idx)) if is_class[b].any() and rng.uniform() < self.share]
        if not rows:
            return
        others = [self._other_view(int(idx[b]), rng) for b in rows]
        vectors = self.projection(self.embeddings[others].to(self.device))  # (R, D)
        residual = torch.zeros(*ids.shape, vectors.shape[1], device=self.device)
        positions = torch.tensor([int(is_class[b].nonzero()[0]) for b in rows])
        residual = residual.index_put((torch.tensor(rows), positions), vectors)
        self.pending = residual

    def _other_view(self, index: int, rng: np.random.Generator) -> int:
        """Another training render of sample ``index``'s identity (itself only when it is the only one)."""
        others = [i for i in self.views[index] if i != index]
        return int(rng.choice(others)) if others else index

    def save(self, ckpt: Path, step: int) -> None:
        save_file(_to_cpu(self.projection.state_dict()), str(ckpt / "identity_tokens.safetensors"),
                  metadata={"step": str(step)})
        torch.save(_to_cpu(self.opt.state_dict()), ckpt / "identity_tokens_optimizer.pt")

    def load(self, ckpt: Path, step: int) -> bool:
        """Resume W and its optimiser from ``ckpt`` if they were saved at ``step`` (the checkpoint's);
        False otherwise: none there, or left from an earlier stretch run without identity tokens."""
        weights = saved_projection(ckpt, step)
        if weights is None:
            return False
        self.projection.load_state_dict(weights)
        self.projection.to(self.device)
        self.opt.load_state_dict(torch.load(ckpt / "identity_tokens_optimizer.pt", weights_only=True, map_location="cpu"))
        return True


CONTINUE_FOLDER_PARTS = ("unet", "text_encoder", "vae", "image_encoder", "pretrain.json")


def check_continue_folder(folder: Path) -> None:
    """Refuse, in a sentence, a folder the UNet stage cannot continue from."""
    from studio.errors import StudioError

    missing = [part for part in CONTINUE_FOLDER_PARTS if not (folder / part).exists()]
    if missing:
        raise StudioError(f"{folder} is not a trained toy model folder to continue from: it lacks "
                          f"{', '.join(missing)} (it needs {', '.join(CONTINUE_FOLDER_PARTS)}, as assets/toy has)")


def take_folder_latent_space(out: Path, folder: Path) -> dict[str, Any]:
    """Copy a trained toy folder's VAE and image encoder into ``out`` (replacing any there: the
    UNet's latent space comes with them) for a run continued from it; returns its
    ``pretrain.json`` record."""
    check_continue_folder(folder)
    for part in ("vae", "image_encoder"):
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(folder / part, out / part)
    return json.loads((folder / "pretrain.json").read_text())


def center_latent_space(vae, images: np.ndarray, tolerance: float = 0.05) -> torch.Tensor | None:
    """Move the VAE's latent space so that its channel means over ``images`` (N, 64, 64, 3) are
    zero, folded exactly into the two 1x1 convolutions around it: ``quant_conv``'s mean outputs
    shift by -mu and ``post_quant_conv`` adds it back, so every image decodes as before.

    SD's noise schedule never reaches pure noise: at t = 999, sqrt(alpha_bar) = 0.068 of the
    latent is left, so its channel means leak into what the UNet is trained on. Sampling starts
    from noise with no such offset, and a latent space whose means are far from zero (the first
    toy VAE's were -0.9 to +0.6 of the latents' std) sends every sample off course
    (docs/TOY.md, "The latent space is centred"). Returns the raw (unscaled) means moved, (4,),
    or None when none was more than ``tolerance`` of the latents' std from zero."""
    with torch.no_grad():
        z = torch.cat([vae.encode(toy_models.to_input(images[i : i + 256]).to(vae.device)).latent_dist.mean
                       for i in range(0, len(images), 256)])
        mu = z.mean(dim=(0, 2, 3))  # (4,) raw latent channel means
        if (mu.abs() / z.std()).max() <= tolerance:
            return None
        channels = mu.numel()
        vae.quant_conv.bias[:channels] -= mu  # the first half of its outputs are the posterior means
        weight = vae.post_quant_conv.weight[:, :, 0, 0]  # (4, 4)
        vae.post_quant_conv.bias += weight @ mu
    return mu.cpu()


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (B,) of epsilon losses at timesteps ``t`` (B,): min(SNR, gamma) / SNR,
    SNR = alpha_bar / (1 - alpha_bar) from ``alphas_cumprod`` (T,). 1 at noisy steps, small at clean ones."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


LEARNING_RATE = 3e-4


def learning_rate(step: int, warmup_from: int, anneal: tuple[int, int] | None = None) -> float:
    """The UNet stage's learning rate at ``step``: a 200-step linear warm-up from ``warmup_from``,
    then constant, or, with ``anneal = (start, end)``, a cosine from the full rate at ``start`` to a
    tenth of it at ``end``."""
    rate = LEARNING_RATE * min(1.0, (step - warmup_from) / 200)
    if anneal is not None:
        start, end = anneal
        progress = min(1.0, max(0.0, (step - start) / max(1, end - start)))
        rate *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return rate


def anneal_window(state: dict[str, Any], plan: PretrainPlan, step: int) -> tuple[int, int] | None:
    """The (start, end) steps of the learning rate's annealing, or None: it starts at the step it
    was first asked for (kept in the checkpoint's ``state``, which this updates) and ends at
    ``plan.unet_steps``. A changed end or a resume without it is said in the log."""
    if not plan.anneal:
        if "anneal_from" in state:
            _log(f"[backbone] this run annealed from step {state['anneal_from']}; without --anneal the rate is constant again")
        return None
    start, end, before = state.setdefault("anneal_from", step), plan.unet_steps, state.get("anneal_to")
    if before is not None and before != end:
        _log(f"[backbone] the annealing now ends at step {end} (it was to end at {before})")
    state["anneal_to"] = end
    _log(f"[backbone] learning rate annealed from step {start} to {end}")
    return start, end


def stage_backbone(out: Path, plan: PretrainPlan) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.backbone import SD15_SCHEDULER_CONFIG, load_tokenizer

    train = load_set(out, "train")
    _write_folder_files(out)
    ckpt = out / "checkpoint"
    resumed = (ckpt / "state.json").exists()
    folder = Path(plan.continue_from) if plan.continue_from and not resumed else None
    continued = take_folder_latent_space(out, folder) if folder is not None else None
    if not (out / "vae" / "diffusion_pytorch_model.safetensors").exists():
        _train_vae(train, plan, out / "vae")
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval().to(device)
    moved = center_latent_space(vae, train["images"][:2048])
    if moved is not None:  # a VAE from before centring (e.g. a continued folder's): the UNet adapts from here
        vae.to("cpu").save_pretrained(str(out / "vae"), safe_serialization=True)
        vae.to(device)
        _log(f"[backbone] centred the VAE's latent space (raw channel means {moved.numpy().round(3).tolist()} moved to 0)")
    latents = _encode_all(vae, train["images"], device)
    _log(f"[backbone] latents {tuple(latents.shape)}, std {latents.std():.3f}, on {device}")
    del vae

    tokenizer = load_tokenizer()
    torch.manual_seed(plan.seed + 5)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    step, elapsed = 0, 0.0
    state: dict[str, Any] = {"unet_head_width": plan.unet_head_width, "unet_fine_attention": plan.unet_fine_attention}
    if resumed:  # weights are loaded on the CPU, then everything moves to the device together
        state = json.loads((ckpt / "state.json").read_text())
        state.setdefault("unet_head_width", None)  # a checkpoint from before the setting
        state.setdefault("unet_fine_attention", False)
    elif folder is not None:  # a folder that has the fine level's attention keeps it
        state["unet_fine_attention"] = plan.unet_fine_attention or has_fine_attention(folder / "unet")
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size, state["unet_head_width"],
                                              state["unet_fine_attention"]))
    _log(f"[backbone] UNet attention: {unet_heads(unet)}")
    if resumed:
        step, elapsed = state["step"], state["elapsed"]
        unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
        text_encoder.load_state_dict(load_file(str(ckpt / "text_encoder.safetensors")))
    elif continued is not None:  # its weights (and so the EMA) and its step; Adam's moments start fresh
        step = int(continued["unet_steps"])
        state = {**state, "warmup_from": step, "continued_from": {"folder": str(folder), "unet_steps": step,
                                                                  "minutes": continued.get("minutes")}}
        added = load_unet_weights(unet, load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
        text_encoder.load_state_dict(load_file(str(folder / "text_encoder" / "model.safetensors")))
        _log(f"[backbone] continuing {folder} from its step {step}"
             + (f"; added {', '.join(added)} as no-ops" if added else ""))
    unet.to(device)
    text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, LEARNING_RATE, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    if resumed:
        ema_tensors = load_file(str(ckpt / "ema.safetensors"), device=str(device))
        ema = [ema_tensors[str(i)] for i in range(len(params))]
        # loaded on the CPU: load_state_dict moves the moments to the parameters' device and keeps
        # Adam's step counters on the CPU, where torch wants them
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        _log(f"[backbone] resumed at step {step} ({elapsed / 60:.1f} min done)")
    if moved is not None:  # weights averaged over the old latent space would only hold the new ones back
        ema = [p.detach().clone() for p in params]
        state["latents_centred_at"] = step
    warmup_from = state.get("warmup_from", 0)  # the step Adam's moments started from (later for a continued run)
    anneal = anneal_window(state, plan, step)
    identity_tokens = None
    if plan.identity_token_share > 0:
        identity_tokens = IdentityTokens(out, plan, train, tokenizer, text_encoder.config.hidden_size, device)
        resumed_tokens = resumed and identity_tokens.load(ckpt, step)
        text_encoder.get_input_embeddings().register_forward_hook(identity_tokens.hook)
        _log(f"[backbone] identity tokens in {plan.identity_token_share:.0%} of the captions"
             f" ({'resumed' if resumed_tokens else 'W from zero'})")
    trained_apart = list(identity_tokens.projection.parameters()) if identity_tokens is not None else []
    optimisers = [opt] + ([identity_tokens.opt] if identity_tokens is not None else [])
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod.to(device)
    idents = {}
    rng = np.random.default_rng([plan.seed, step, 6])
    gen = torch.Generator().manual_seed(plan.seed * 7919 + step)
    budget = plan.unet_minutes * 60
    started = time.time() - elapsed
    progress = Progress("unet", None, deadline=started + budget)
    n = len(latents)
    attr_names = list(ATTRIBUTES)

    def save_checkpoint() -> None:
        ckpt.mkdir(exist_ok=True)
        save_file(_to_cpu(unet.state_dict()), str(ckpt / "unet.safetensors"))
        save_file(_to_cpu(text_encoder.state_dict()), str(ckpt / "text_encoder.safetensors"))
        save_file(_to_cpu({str(i): e.contiguous() for i, e in enumerate(ema)}), str(ckpt / "ema.safetensors"))
        torch.save(_to_cpu(opt.state_dict()), ckpt / "optimizer.pt")
        if identity_tokens is not None:
            identity_tokens.save(ckpt, step)
        (ckpt / "state.json").write_text(json.dumps({**state, "step": step, "elapsed": time.time() - started}))

    losses: list[float] = []
    unet.train()
    text_encoder.train()
    while time.time() - started < budget and (plan.unet_steps is None or step < plan.unet_steps):
        step += 1
        idx = rng.integers(0, n, plan.unet_batch)
        texts = []
        for i in idx:
            number = int(train["identity"][i])
            ident = idents.get(number) or idents.setdefault(number, Identity.from_number(number))
            scene = Scene(**{a: list(ATTRIBUTES[a])[int(train["attributes"][i, k])] for k, a in enumerate(attr_names)})
            texts.append("" if rng.uniform() < 0.1 else caption(ident, scene, rng))
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        if identity_tokens is not None:
            identity_tokens.prepare(ids, idx, rng)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)  # drawn on the CPU: the same run on any device
        # half the batch from the noisiest 40 %: those steps set the layout and are learned last
        t = torch.where(torch.rand(len(idx), generator=gen) < 0.5, torch.randint(0, 1000, (len(idx),), generator=gen),
                        torch.randint(600, 1000, (len(idx),), generator=gen))
        zt = scheduler.add_noise(z0, noise, t).to(device)
        noise, t = noise.to(device), t.to(device)
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, hidden).sample
        squared = F.mse_loss(pred, noise, reduction="none")  # (B, 4, 16, 16)
        loss = squared.mean()  # the plain loss, logged whatever the weighting
        if plan.unet_feature_weight:  # weighted mean per sample, divided by the mean weight as _pixel_loss does
            weights = feature_weights(train["landmarks"][idx], plan.unet_feature_weight, z0.shape[-1]).to(device)
            per_sample = (squared * weights).mean(dim=(1, 2, 3)) / weights.mean(dim=(1, 2, 3))
        else:
            per_sample = squared.mean(dim=(1, 2, 3))  # (B,)
        objective = per_sample.mean() if plan.min_snr_gamma is None else (per_sample * min_snr_weights(alphas, t, plan.min_snr_gamma)).mean()
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params + trained_apart, 1.0)
        for optimiser in optimisers:
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step, warmup_from, anneal)
            optimiser.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        progress.update(step, loss=float(np.mean(losses[-50:])))
        if step % 250 == 0:
            save_checkpoint()
    save_checkpoint()
    export_checkpoint(out)
    record = {"unet_steps": step, "unet_batch": plan.unet_batch, "minutes": (time.time() - started) / 60,
              "final_loss": float(np.mean(losses[-200:])) if losses else None, "plan": plan.__dict__}
    if "continued_from" in state:  # this run's minutes are its own; the folder's came before
        record["continued_from"] = state["continued_from"]
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    _log(f"[backbone] done: {step} steps")


def unet_heads(unet) -> str:
    """E.g. "down_blocks.1: 2 heads of 32, ..." for each block with attention."""
    seen: dict[str, str] = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            block = ".".join(name.split(".")[:2]) if not name.startswith("mid_block") else "mid_block"
            seen.setdefault(block, f"{module.heads} heads of {module.to_q.out_features // module.heads}")
    return ", ".join(f"{block}: {text}" for block, text in seen.items())


def export_checkpoint(out: Path, target: Path | None = None) -> None:
    """Write the EMA weights of the last UNet + text-encoder checkpoint as the diffusers
    folder's ``unet/`` and ``text_encoder/`` (``target``: another folder, e.g. for a look at
    a run in progress)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.backbone import load_tokenizer

    target = target or out
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(load_tokenizer())))
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size, state.get("unet_head_width"),
                                              state.get("unet_fine_attention", False)))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = load_file(str(ckpt / "ema.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(ema[str(i)])
    unet.save_pretrained(str(target / "unet"), safe_serialization=True)
    # fp16 on disk halves the 49 408-row embedding table; the studio loads it as the preset's dtype
    text_encoder.to(torch.float16).save_pretrained(str(target / "text_encoder"), safe_serialization=True)


def pretrain(out: Path, stages: tuple[str, ...] = STAGES, plan: PretrainPlan = PretrainPlan(), threads: int = 2) -> None:
    """Run the named stages into ``out`` (each resumable)."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        t = time.time()
        {"data": lambda: stage_data(out, plan, workers=threads), "instruments": lambda: stage_instruments(out, plan),
         "backbone": lambda: stage_backbone(out, plan), "decoder": lambda: stage_decoder(out, plan)}[stage]()
        _log(f"[{stage}] finished in {(time.time() - t) / 60:.1f} min")
