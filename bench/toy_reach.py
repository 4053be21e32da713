"""Toy world: can the prompt's conditioning alone pull the base model's images toward a person?

    python bench/toy_reach.py [--run DIR] [--identities 3] [--iterations 60]

An upper bound for every method that learns token embeddings (textual inversion, PersonaMagic):
one free token vector v in place of the class word is optimised *directly for likeness* — the toy
identity encoder's similarity between the selfie and the image a short DDIM loop draws from
fixed noise with v in the prompt, gradients through the loop, the VAE decoder and the encoder
(alignment from the toy locator's eyes, held fixed per step). Likeness is then measured with the
studio's scorer on *other* noise seeds than those optimised on, beside the class word's images
and other identities' renders. If even this v cannot raise likeness, no embedding-learning
method can in this backbone: what limits one-shot identity is the pretrained model's reach, not
the training objective. Prints a markdown section; nothing is copied in.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toy_caps import mean_identity  # noqa: E402
from toy_world import FIRST, World, cpu_name, model_source, to_images, to_tensor  # noqa: E402

PROMPT = "a photo of {} on a beach"
TUNED_ROW = "v optimised for likeness (other seeds than optimised on)"
TOKEN_ROW = "class word + the pretraining's identity token W e of the selfie (nothing optimised)"


def embed_differentiably(instruments, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1] -> toy identity embeddings (N, 128), with gradients to the pixels.

    The crop follows the toy face step (eyes on the canonical positions); the eyes come from the
    locator without gradient, the crop is a differentiable ``grid_sample`` of the pixels.
    """
    from studio.toy.models import CROP_SIZE, alignment_matrix

    size = pixels.shape[-1]
    with torch.no_grad():
        landmarks, _ = instruments.locator(pixels)
    def to_norm(n: int) -> np.ndarray:  # pixels -> normalised coordinates of an n-pixel side (align_corners=False)
        return np.array([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]])

    thetas = []
    for marks in landmarks.numpy() * size:
        photo_to_crop = np.vstack([alignment_matrix(marks[0], marks[1], CROP_SIZE), [0, 0, 1]])
        # affine_grid maps crop -> photo
        thetas.append((to_norm(size) @ np.linalg.inv(photo_to_crop) @ np.linalg.inv(to_norm(CROP_SIZE)))[:2])
    grid = F.affine_grid(torch.tensor(np.stack(thetas), dtype=pixels.dtype), [len(pixels), 3, CROP_SIZE, CROP_SIZE],
                         align_corners=False)
    crops = F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
    return instruments.identity(crops)


def draw(world: World, vector: torch.Tensor | None, seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """(N, 3, 64, 64) pixels drawn by a DDIM loop from each seed's noise, with ``vector`` (D,) in
    place of the class word (None: the class word itself); differentiable in ``vector``."""
    from diffusers import DDIMScheduler

    from studio.conditioning import encode_text, super_category_id, tokenize

    bb = world.backbone
    slot = super_category_id(bb.tokenizer, world.cfg.concept.super_category)
    ids, mask = tokenize(bb.tokenizer, [PROMPT] * len(seeds), 1 if vector is not None else 0, slot)
    identity = vector[None, None].expand(len(seeds), 1, -1) if vector is not None else None
    cond = encode_text(bb, ids, identity_mask=mask if vector is not None else None, identity=identity).hidden
    empty, _ = tokenize(bb.tokenizer, [""] * len(seeds), 0, slot)
    uncond = encode_text(bb, empty).hidden
    scheduler = DDIMScheduler.from_config(bb.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    side = bb.native_resolution // bb.vae_scale_factor
    z = torch.cat([torch.randn((1, bb.unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(s))
                   for s in seeds])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = bb.unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
        z = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, z).prev_sample
    return bb.vae.decode(z / bb.vae.config.scaling_factor).sample.clamp(-1, 1)


class PretrainingToken:
    """The token a run pretrained with identity tokens (``--identity-tokens``) put in a caption
    for a person: the class word's embedding + W e, e the run's image encoder's embedding of a
    photo. ``of_run`` gives None for a run without them (the shipped folder never holds W)."""

    def __init__(self, encoder, projection: torch.Tensor, slot: torch.Tensor) -> None:
        self.encoder, self.projection, self.slot = encoder, projection, slot  # W (D, E), slot (D,)

    @classmethod
    def of_run(cls, run: Path | None, world: World) -> PretrainingToken | None:
        from transformers import CLIPVisionModelWithProjection

        from studio.conditioning import super_category_id
        from studio.toy.pretrain import saved_projection

        if run is None:
            return None
        step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
        weights = saved_projection(run / "checkpoint", step)
        if weights is None:
            return None
        bb = world.backbone
        slot = bb.text_encoder.get_input_embeddings().weight[super_category_id(bb.tokenizer, world.cfg.concept.super_category)]
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(run / "image_encoder")).eval()
        return cls(encoder, weights["weight"], slot.detach().float())

    @torch.no_grad()
    def of(self, photo: Path) -> torch.Tensor:
        """(D,) the token for the person in ``photo``."""
        from PIL import Image

        from studio.toy.models import to_input
        from studio.toy.pretrain import vision_embed

        pixels = to_input(np.asarray(Image.open(photo).convert("RGB").resize((64, 64)))[None])
        return self.slot + vision_embed(self.encoder, pixels)[0] @ self.projection.T


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its last checkpoint and VAE (default: the shipped assets/toy)")
    parser.add_argument("--identities", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60,
                        help="optimisation steps of v; 0 = no v, only the class word and the pretraining's identity token")
    parser.add_argument("--steps", type=int, default=8, help="DDIM steps of the differentiable loop")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-reach"))
    args = parser.parse_args()
    from studio.conditioning import super_category_id
    from studio.toy.instruments import load_instruments
    from studio.toy.world import render_prompt

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    world = World({"model.source": model_source(args.run, args.out)})
    bb = world.backbone
    bb.unet.requires_grad_(False)
    bb.text_encoder.requires_grad_(False)
    bb.vae.requires_grad_(False)
    instruments = load_instruments()
    pretraining_token = PretrainingToken.of_run(args.run, world)
    train_seeds, test_seeds = [0, 1], [10, 11, 12, 13]
    prompts = [PROMPT] * len(test_seeds)
    rows: dict[str, list[float]] = {}
    for k in range(args.identities):
        identity = FIRST + 600 + k  # unseen, and not the identities the other toy benches use
        selfie = world.selfie(identity, args.out)
        refs = world.scorer.embed_references([str(selfie)])
        with torch.no_grad():
            target = embed_differentiably(instruments, to_tensor([render_prompt(identity, "a photo of {}", seed=7)]))[0]
        slot = bb.text_encoder.get_input_embeddings().weight[super_category_id(bb.tokenizer, world.cfg.concept.super_category)]
        vector = slot.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([vector], lr=5e-2)
        first = last = None
        for _ in range(args.iterations):
            likeness = (embed_differentiably(instruments, draw(world, vector, train_seeds, args.steps, args.guidance))
                        @ target).mean()
            optimiser.zero_grad()
            (-likeness).backward()
            optimiser.step()
            first = likeness.item() if first is None else first
            last = likeness.item()
        token = pretraining_token.of(selfie) if pretraining_token is not None else None
        with torch.no_grad():
            tuned = to_images(draw(world, vector, test_seeds, 20, args.guidance)) if args.iterations else None
            plain = to_images(draw(world, None, test_seeds, 20, args.guidance))
            given = to_images(draw(world, token, test_seeds, 20, args.guidance)) if token is not None else None
        others = [render_prompt(identity + 1000 + j, PROMPT, seed=100 + j) for j in range(len(test_seeds))]
        drawn = {"class word (the base model)": plain}
        if tuned is not None:
            drawn[TUNED_ROW] = tuned
        if given is not None:
            drawn[TOKEN_ROW] = given
        for label, images in {**drawn, "other identities' renders (baseline)": others}.items():
            rows.setdefault(label, []).append(mean_identity(world, images, prompts, refs)[0])
        base_row = rows["class word (the base model)"]
        if tuned is not None:
            rows.setdefault("v optimised minus the class word, paired per identity", []).append(
                rows[TUNED_ROW][-1] - base_row[-1])
            rows.setdefault("likeness on the optimised seeds: first → last iteration (encoder's own crop)", []).append(
                (first, last))
        if given is not None:
            rows.setdefault("the pretraining's identity token minus the class word, paired", []).append(
                rows[TOKEN_ROW][-1] - base_row[-1])
        for j, image in enumerate(tuned or []):
            image.save(args.out / f"reach-{identity}-{j}.png")
        for j, image in enumerate(given or []):
            image.save(args.out / f"reach-token-{identity}-{j}.png")
        found = {label: f"{values[-1]:.3f}" for label, values in rows.items() if not isinstance(values[-1], tuple)}
        print(f"identity {identity}: {found} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    lines = [
        f"Command: `python bench/toy_reach.py --identities {args.identities} --iterations {args.iterations}"
        f"{f' --run {args.run}' if args.run else ''}` ({cpu_name()}; {time.perf_counter() - started:.0f} s). "
        f"Prompt \"{PROMPT}\"; {args.identities} unseen identities (from {FIRST + 600}); "
        + (f"v optimised on seeds {train_seeds} through a DDIM {args.steps} loop (guidance {args.guidance}), "
           if args.iterations else "")
        + f"scored on seeds {test_seeds} with DDIM 20 by the studio's toy scorer; mean ± std over identities.",
        "", "| images | identity to the selfie |", "|---|---|",
    ]
    for label, values in rows.items():
        if isinstance(values[0], tuple):
            a, b = np.array(values).T
            lines.append(f"| {label} | {a.mean():.3f} → {b.mean():.3f} |")
        else:
            lines.append(f"| {label} | {np.nanmean(values):.3f} ± {np.nanstd(values):.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
