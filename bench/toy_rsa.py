"""Toy world: does reference-aware self-attention pull an instant preview toward the person? (docs/COMPOSE.md)

    python bench/toy_rsa.py --identities 6 --prompts 4 [--run DIR] [--out DIR]

For each of N unseen identities: RSA previews with that identity's toy selfie as the only
reference (no training), for the first P toy prompts x 2 seeds, under several RSA settings.
Each setting is scored paired per identity: the previews' likeness to their own selfie minus
their likeness to the other identities' selfies of the same run (which the same previews were
not made from). A setting that transfers the person makes this positive; one that only moves
the picture (the pixel change against the base model's images, same prompts and seeds) leaves
it at zero. Mean and 95 % interval over identities. Every figure comes from this run.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_world import FIRST, PROMPTS, SEEDS, World, ci95, cpu_name, likeness_to_strangers, model_source  # noqa: E402

ALL_BLOCKS = ["down_blocks", "mid_block", "up_blocks"]
# name -> compose overrides; the first is the toy preset's own
SETTINGS: dict[str, dict] = {
    "preset (face 1, context 0.3, mid + up blocks)": {},
    "face 4, context 1": {"rsa_weight": 4.0, "rsa_context_weight": 1.0},
    "face 10, context 1, every block": {"rsa_weight": 10.0, "rsa_context_weight": 1.0, "rsa_blocks": ALL_BLOCKS},
    "face 30, context 3, every block": {"rsa_weight": 30.0, "rsa_context_weight": 3.0, "rsa_blocks": ALL_BLOCKS},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4, help=f"first N of the {len(PROMPTS)} toy prompts")
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its VAE and last checkpoint (default: the shipped assets/toy)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-rsa"))
    args = parser.parse_args()
    if args.identities < 2:
        parser.error("--identities must be at least 2: each is scored against the others")
    args.out.mkdir(parents=True, exist_ok=True)

    from studio.compose import Composer, Person, Reference
    from studio.faces import prepare
    from studio.sampler import GenerationSettings

    world = World({"model.source": model_source(args.run, args.out)})
    cfg = world.cfg
    identities = [FIRST + 300 + 10 * k for k in range(args.identities)]  # not the other benches' identities
    selfies = {k: world.selfie(k, args.out) for k in identities}
    refs = {k: world.scorer.embed_references([str(p)])[0] for k, p in selfies.items()}
    prompts = PROMPTS[: args.prompts]
    settings = GenerationSettings.from_config(cfg, seeds=SEEDS).kwargs()  # what World.generate uses for the base images
    started = time.perf_counter()
    base = [image for prompt in prompts for image in world.generate(None, [prompt], SEEDS)]

    def own_minus_others(images, identity: int) -> float:
        own = likeness_to_strangers(world, images, [refs[identity]])[0]
        return own - likeness_to_strangers(world, images, [refs[k] for k in identities if k != identity])[0]

    rows = []
    for name, change in SETTINGS.items():
        composer = Composer(world.sampler, replace(cfg.compose, **change))
        paired, moved = [], []
        for identity in identities:
            photo = prepare([str(selfies[identity])], cfg.face).photos[0]
            person = Person(reference=Reference.from_prepared(photo), class_word=cfg.concept.super_category)
            previews = [image for prompt in prompts
                        for image in composer([person], prompt.replace("{}", "{0}"), **settings).images]
            paired.append(own_minus_others(previews, identity))
            moved.append(np.mean([np.abs(np.asarray(p, np.float64) - np.asarray(b, np.float64)).mean()
                                  for p, b in zip(previews, base)]))
        rows.append((name, *ci95(paired), float(np.mean(moved))))
        print(f"[rsa] {name} done", file=sys.stderr, flush=True)
    base_paired = ci95([own_minus_others(base, k) for k in identities])

    n = len(prompts) * len(SEEDS)
    lines = [
        "### Instant previews: does reference attention carry the person? (toy world)\n",
        f"Machine: {cpu_name()}. {len(identities)} unseen identities ({identities[0]}, {identities[1]}, …), one toy "
        f"selfie each, {n} previews per identity and setting ({len(prompts)} prompts × {len(SEEDS)} seeds, "
        f"{cfg.sample.steps} steps); {time.perf_counter() - started:.0f} s.",
        f"Command: `python bench/toy_rsa.py --identities {args.identities} --prompts {args.prompts}"
        + (f" --run {args.run}" if args.run else "") + "`.\n",
        "| RSA setting | likeness to own selfie minus to the others' (paired, mean ± 95 %) | pixel change vs base model (0-255) |",
        "|---|---|---|",
        f"| none: base model, class word (the same images for every identity) | {base_paired[0]:+.3f} ± {base_paired[1]:.3f} | 0 |",
    ]
    lines += [f"| {name} | **{mean:+.3f} ± {half:.3f}** | {moved:.1f} |" for name, mean, half, moved in rows]
    text = "\n".join(lines)
    (args.out / "toy_rsa.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
