"""Composition in the toy world: two unseen identities in one picture, and instant likeness (docs/COMPOSE.md).

    python bench/toy_compose.py --out bench/out/toy-compose            # full size (lead)
    python bench/toy_compose.py --train-steps 20 --prompts 2 --seeds 1 --steps 8 --out /tmp/tc   # smoke size
    python bench/toy_compose.py --run /work/toyrun --set compose.aspect=1 --out /tmp/tc   # a run's weights, a square

Two identities A and B (>= 100000, never seen in pretraining) each get one toy selfie and a
concept trained with the toy preset (``--train-steps`` overrides its steps). For every prompt x
seed, "{0} and {1} ..." is composed four ways, on the picture two people get in the studio
(``compose.aspect`` times as wide as high; ``--set compose.aspect=1`` for the model's square):

- regions, located: region-grouped attention with regions found from the attention maps, with
  the preset's ``compose.locate_grouping`` and (unless that is "tokens") with "tokens" beside it;
- regions, left/right: the same with user boxes (A left, B right);
- naive: both concepts' tokens in one prompt, no regions, scored on the left/right halves with
  whichever assignment of A and B suits it better (the baseline beside the region modes).

Each person's region crop is scored with the toy identity encoder against both selfies; an
image counts as separated when both regions are closer to their own identity than to the
other. Instant previews: RSA with A's selfie only (no training), single person, scored against
A's selfie and against an unrelated identity C's selfie (baseline), beside the base model
with the class word. Every figure comes from this run. Prints a markdown section.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_world import PROMPTS, World, cpu_name, grid, model_source  # noqa: E402

IDENTITY_A, IDENTITY_B, IDENTITY_C = 100_101, 100_202, 100_303


def pair_prompt(prompt: str) -> str:
    return prompt.replace("{}", "{0} and {1}")


def similarity(world: World, crop, refs) -> float | None:
    from studio.metrics import identity_score

    if crop is None:
        return None
    return identity_score(crop, refs, world.scorer.analyzer).similarity


def machine() -> str:
    """The CPU model and its core count (nproc would count OMP_NUM_THREADS instead)."""
    name = cpu_name()
    return f"{name.rsplit(',', 1)[0]}, {os.cpu_count()} vCPUs)" if "(" in name else f"{name} ({os.cpu_count()} vCPUs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-compose"))
    parser.add_argument("--train-steps", type=int, help="training steps per concept (default: the toy preset's)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the 8 prompts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the toy preset's)")
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its last checkpoint and VAE (default: the shipped assets/toy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a toy preset setting, e.g. --set compose.rsa_weight=3")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from studio.cli import parse_overrides
    from studio.compose import Composer, Person, Reference, region_crop, side_boxes
    from studio.faces import prepare
    from studio.sampler import GenerationSettings

    world = World({"model.source": model_source(args.run, args.out), **parse_overrides(args.set)})
    cfg = world.cfg
    composer = Composer(world.sampler, cfg.compose)
    prompts, seeds = PROMPTS[: args.prompts], list(range(args.first_seed, args.first_seed + args.seeds))
    height, width = composer.canvas(cfg.image_size, 2)  # the pair's picture (the Compose tab's); one person: a square
    # the Compose tab's settings (the preset's), one image per seed
    pair_settings = GenerationSettings.from_config(cfg, num_inference_steps=args.steps, seeds=seeds, height=height, width=width)
    one_settings = GenerationSettings.from_config(cfg, num_inference_steps=args.steps, seeds=seeds)
    steps = pair_settings.num_inference_steps
    overrides = {"train.steps": args.train_steps} if args.train_steps else {}

    selfies = {k: world.selfie(k, args.out) for k in (IDENTITY_A, IDENTITY_B, IDENTITY_C)}
    refs = {k: world.scorer.embed_references([str(p)]) for k, p in selfies.items()}
    t0 = time.perf_counter()
    concepts = {k: world.train(selfies[k], overrides)[0] for k in (IDENTITY_A, IDENTITY_B)}
    train_s = time.perf_counter() - t0
    photo_a = prepare([str(selfies[IDENTITY_A])], cfg.face).photos[0]

    people = [Person(concept=concepts[IDENTITY_A]), Person(concept=concepts[IDENTITY_B])]
    ab = (IDENTITY_A, IDENTITY_B)
    grouping = cfg.compose.locate_grouping
    variants = {  # name: (composer, file name, mode and boxes)
        f"regions, located ({grouping})": (composer, "located", dict(mode="regions", boxes=None)),
    }
    if grouping != "tokens":  # the grouping before clusters, beside it
        by_tokens = Composer(world.sampler, dataclasses.replace(cfg.compose, locate_grouping="tokens"))
        variants["regions, located (tokens: each pixel to the class word it attends most)"] = (
            by_tokens, "located-tokens", dict(mode="regions", boxes=None))
    variants["regions, left/right boxes"] = (composer, "boxes", dict(mode="regions", boxes=side_boxes(2)))
    variants["naive (one prompt, no regions)"] = (composer, "naive", dict(mode="naive", boxes=None))
    table, raw, sheets = [], {}, {}
    latent_hw = (height // world.backbone.vae_scale_factor, width // world.backbone.vae_scale_factor)
    halves = np.ones(latent_hw, np.int64)  # naive images are scored on their left (A) and right (B) halves
    halves[:, latent_hw[1] // 2:] = 2
    t1 = time.perf_counter()
    for name, (maker, file_name, variant) in variants.items():
        separated, own_all, other_all, found, images, overlays = [], [], [], [], [], []
        for prompt in prompts:
            result = maker(people, pair_prompt(prompt), **variant, **pair_settings.kwargs())
            overlays += result.overlays
            for image, labels in zip(result.images, result.regions):
                images.append(image)
                labels = labels if variant["mode"] == "regions" else halves
                crops = [region_crop(image, labels, p) for p in range(2)]
                sims = [[similarity(world, crops[p], refs[k]) for k in ab] for p in range(2)]  # sims[region][identity]
                ok = all(s is not None for row in sims for s in row)
                found.append(ok)
                if not ok:
                    separated.append(False)
                    continue
                straight = sims[0][0] > sims[0][1] and sims[1][1] > sims[1][0]
                if variant["mode"] == "naive":  # either assignment counts for the naive baseline
                    swapped = sims[0][1] > sims[0][0] and sims[1][0] > sims[1][1]
                    separated.append(straight or swapped)
                    pair = (sims[0][0] + sims[1][1], sims[0][1] + sims[1][0])
                    own_all.append(max(pair) / 2)
                    other_all.append(min(pair) / 2)
                else:
                    separated.append(straight)
                    own_all += [sims[0][0], sims[1][1]]
                    other_all += [sims[0][1], sims[1][0]]
        grid(images, args.out / f"compose-{file_name}.png", cols=max(1, len(seeds) * 4))
        if variant["mode"] == "regions":
            grid(overlays, args.out / f"compose-{file_name}-regions.png", cols=max(1, len(seeds) * 4))
        raw[name] = dict(separated=separated, own=own_all, other=other_all, face_found=found)
        table.append((name, np.mean(separated), np.mean(own_all) if own_all else float("nan"),
                      np.mean(other_all) if other_all else float("nan"), np.mean(found), len(separated)))
    compose_s = time.perf_counter() - t1

    # Instant previews: A's selfie as the only reference, no concept.
    instant = Person(reference=Reference.from_prepared(photo_a), class_word=cfg.concept.super_category)
    previews, base = [], []
    for prompt in prompts:
        previews += composer([instant], prompt.replace("{}", "{0}"), **one_settings.kwargs()).images
        base += world.generate(None, [prompt], seeds)
    grid(previews, args.out / "instant.png", cols=max(1, len(seeds) * 4))

    def mean_identity(images, key):
        values = [similarity(world, im, refs[key]) for im in images]
        values = [v for v in values if v is not None]
        return (float(np.mean(values)) if values else float("nan")), len(values)

    moved = float(np.mean([np.abs(np.asarray(p, np.float64) - np.asarray(b, np.float64)).mean()
                           for p, b in zip(previews, base)]))  # what reference attention changed, 0-255
    to_a, n_a = mean_identity(previews, IDENTITY_A)
    to_c, n_c = mean_identity(previews, IDENTITY_C)
    base_a, n_base = mean_identity(base, IDENTITY_A)
    raw["instant"] = dict(to_a=to_a, to_c=to_c, base_to_a=base_a, pixel_change=moved)
    (args.out / "toy_compose.json").write_text(json.dumps(raw, indent=2, default=float))

    n = len(prompts) * len(seeds)
    lines = [
        f"### Two people in one picture, and instant likeness (toy world)\n",
        f"Machine: {machine()}, shared. Identities A={IDENTITY_A}, B={IDENTITY_B} (unseen), one 256 px selfie each; "
        f"concepts trained with the toy preset ({args.train_steps or cfg.train.steps} steps each, {train_s:.0f} s for both); "
        f"{len(prompts)} prompts × {len(seeds)} seeds = {n} images per row, {width} × {height} px, {steps} denoising steps; "
        f"compositions took {compose_s:.0f} s.",
        f"Command: `python bench/toy_compose.py --prompts {args.prompts} --seeds {args.seeds}"
        + (f" --first-seed {args.first_seed}" if args.first_seed else "")
        + (f" --train-steps {args.train_steps}" if args.train_steps else "") + (f" --steps {args.steps}" if args.steps else "")
        + "".join(f" --set {item}" for item in args.set) + (f" --run {args.run}" if args.run else "") + "`.\n",
        "| composition | both regions closer to their own identity | identity to own (mean) | identity to the other (mean) | faces found in both regions | images |",
        "|---|---|---|---|---|---|",
    ]
    for name, sep, own, other, face, count in table:
        lines.append(f"| {name} | **{sep:.0%}** | {own:.3f} | {other:.3f} | {face:.0%} | {count} |")
    goal = table[0][1] >= 0.8
    lines += [
        "",
        f"- located regions separate the two people in ≥ 80 % of the images: **{goal}**",
        "",
        "| instant preview (A's selfie, no training) | identity (mean) | scored images |",
        "|---|---|---|",
        f"| RSA previews, to A's selfie | **{to_a:.3f}** | {n_a} |",
        f"| the same previews, to an unrelated identity C's selfie (baseline) | {to_c:.3f} | {n_c} |",
        f"| base model with the class word, to A's selfie | {base_a:.3f} | {n_base} |",
        "",
        f"- RSA previews above the unrelated-identity baseline: **{to_a > to_c}**",
        f"- mean pixel change of the RSA previews against the base model's images (same prompts and seeds): "
        f"{moved:.2f} of 255",
    ]
    text = "\n".join(lines)
    (args.out / "toy_compose.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
