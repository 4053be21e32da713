"""Toy world: where the identity signal is lost on the way from a render to a generated image.

    python bench/toy_caps.py --identities 8 [--run DIR]    # DIR: a pretraining run's folder (default: assets/toy)

For unseen identities (>= 100 000), each with its one toy selfie, the ground-truth renders of the
8 toy prompts x 2 seeds are scored for identity (toy encoder, to the selfie) as they are, blurred,
through the VAE (encode + decode), and as the UNet's one-step estimate of the clean image from
the render's latent noised to t (x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t), prompt with the class
word), beside images the base model draws from pure noise for the same prompts (a plain DDIM loop):
the gap between two rows is what that stage costs. Renders of other identities give the
baseline. If the VAE row is already near the baseline, no UNet and no concept can show a likeness.
Prints a markdown section; nothing is copied in.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toy_world import FIRST, PROMPTS, SEEDS, World, cpu_name, identity_values, model_source, to_images, to_tensor  # noqa: E402


@torch.no_grad()
def unet_estimate(world: World, images: list[Image.Image], prompts: list[str], t: int, seed: int) -> list[Image.Image]:
    """The UNet's one-step x0 estimate from each render's latent noised to timestep ``t``."""
    bb = world.backbone
    scale = bb.vae.config.scaling_factor
    z0 = bb.vae.encode(to_tensor(images)).latent_dist.mean * scale
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=generator)
    alpha = bb.noise_scheduler.alphas_cumprod[t]
    zt = alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise
    word = world.cfg.concept.super_category
    ids = bb.tokenizer([p.replace("{}", f"a {word}") for p in prompts], padding="max_length",
                       max_length=bb.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    text = bb.text_encoder(ids)[0]
    eps = bb.unet(zt, torch.full((len(images),), t), encoder_hidden_states=text).sample
    x0 = (zt - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    return to_images(bb.vae.decode(x0 / scale).sample)


@torch.no_grad()
def sampled_from_noise(world: World, prompts: list[str], seed: int, steps: int = 50, guidance: float = 3.0):
    """Images drawn from pure noise by a plain DDIM loop (diffusers' scheduler, no studio code),
    prompt with the class word: what the base model draws, independent of the studio's sampler."""
    from diffusers import DDIMScheduler

    bb = world.backbone
    scheduler = DDIMScheduler.from_config(bb.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    word = world.cfg.concept.super_category
    texts = [p.replace("{}", f"a {word}") for p in prompts] + [""] * len(prompts)
    ids = bb.tokenizer(texts, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
    cond, uncond = bb.text_encoder(ids)[0].chunk(2)
    side = bb.native_resolution // bb.vae_scale_factor
    z = torch.randn((len(prompts), bb.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = bb.unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
        z = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, z).prev_sample
    return to_images(bb.vae.decode(z / bb.vae.config.scaling_factor).sample)


def mean_identity(world: World, images, prompts, refs) -> tuple[float, float]:
    """(mean identity over the images where the toy locator found a face, share of such images)."""
    scores = world.score(images, prompts, refs)
    values = identity_values(scores)
    found = float(np.mean([s.identity.face_found for s in scores]))
    return (float(np.mean(values)) if values else float("nan")), found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--timesteps", default="100,300,500,700,900")
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its last checkpoint and VAE (default: the shipped assets/toy)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-caps"))
    args = parser.parse_args()
    from studio.toy.world import render_prompt

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    world = World({"model.source": model_source(args.run, args.out)})
    timesteps = [int(t) for t in args.timesteps.split(",")]
    cells = [(p, s) for p in PROMPTS for s in SEEDS]
    prompts = [p for p, _ in cells]
    rows: dict[str, list[tuple[float, float]]] = {}
    for k in range(args.identities):
        identity = FIRST + 400 + k  # unseen, and not the identities the other toy benches use
        refs = world.scorer.embed_references([str(world.selfie(identity, args.out))])
        renders = [render_prompt(identity, p, seed=100 + s) for p, s in cells]
        others = [render_prompt(identity + 1000 + j, p, seed=100 + s) for j, (p, s) in enumerate(cells)]
        stages = {
            "ground-truth renders": renders,
            "blurred (Gaussian, radius 1 px)": [r.filter(ImageFilter.GaussianBlur(1)) for r in renders],
            "blurred (Gaussian, radius 2 px)": [r.filter(ImageFilter.GaussianBlur(2)) for r in renders],
            "through the VAE (encode + decode)": world.through_vae(renders),
            **{f"UNet's one-step estimate from t = {t}": unet_estimate(world, renders, prompts, t, seed=k)
               for t in timesteps},
            "sampled from pure noise (plain DDIM 50 loop, guidance 3, class word)": sampled_from_noise(world, prompts, k),
            "other identities' renders (baseline)": others,
        }
        for label, images in stages.items():
            rows.setdefault(label, []).append(mean_identity(world, images, prompts, refs))
        print(f"identity {identity} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    lines = [
        "Command: `python bench/toy_caps.py --identities %d%s` (%s; %.0f s). Identity of %d unseen identities "
        "(from %d) to their selfie, 8 prompts x 2 seeds each; mean ± std over identities."
        % (args.identities, f" --run {args.run}" if args.run else "", cpu_name(), time.perf_counter() - started,
           args.identities, FIRST + 400),
        "", "| images | identity to the selfie | face found |", "|---|---|---|",
    ]
    for label, pairs in rows.items():
        values, found = [v for v, _ in pairs], [f for _, f in pairs]
        lines.append(f"| {label} | {np.nanmean(values):.3f} ± {np.nanstd(values):.3f} | {np.mean(found):.0%} |")
    lines.append("\nIdentity is averaged over the images in which the toy locator found a face.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
