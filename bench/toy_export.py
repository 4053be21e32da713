"""Toy world: what exporting costs. The full concept vs its exported static approximation (docs/EXPORT.md).

    python bench/toy_export.py --identities 6 --segments 2,3 --out bench/out/toy-export

For each unseen identity: one toy selfie, the toy preset's training, then every prompt x seed
generated with the full concept (mapper(t) + image bypass, the preset's band and balance) and
with its export cut into N segments (static embeddings, no bypass, balance 1, the same band),
as A1111/ComfyUI/diffusers would run it. Identity (toy encoder, to the selfie) and prompt score
(attribute classifiers) are averaged per identity; the table gives mean ± std over identities.
Prints a markdown section for bench/RESULTS-toy.md; nothing is copied in.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toy_world import FIRST, PROMPTS, SEEDS, World, cpu_name, identity_values, model_source  # noqa: E402


def run(args: argparse.Namespace) -> str:
    from studio.export import exported_concept, static_export

    started = time.perf_counter()
    overrides = {"train.steps": args.steps} if args.steps else {}
    args.out.mkdir(parents=True, exist_ok=True)
    world = World({"model.source": model_source(args.run, args.out)})
    cfg = world.cfg.replace(**overrides) if overrides else world.cfg
    prompts, seeds = PROMPTS[: args.prompts], SEEDS[: args.seeds]
    cells = [(p, s) for p in prompts for s in seeds]
    segment_counts = [int(n) for n in args.segments.split(",")]
    per_identity: dict[str, list[tuple[float, float, float]]] = {"full": [], **{f"export-{n}": [] for n in segment_counts}}
    for k in range(args.identities):
        identity = FIRST + 200 + k  # unseen in pretraining, and not the ones toy_world.py uses
        selfie = world.selfie(identity, args.out)
        concept, _ = world.train(selfie, overrides)
        references = world.scorer.embed_references([str(selfie)])
        band = tuple(cfg.sample.band)
        variants = {"full": (concept, band, cfg.sample.balance)}
        for n in segment_counts:
            export = static_export(concept, f"id{identity}", n, band)
            variants[f"export-{n}"] = (exported_concept(concept, export), export.band, 1.0)
        full_pixels = None
        for label, (variant, variant_band, balance) in variants.items():
            images = world.generate(variant, prompts, seeds, band=variant_band, balance=balance, cfg=cfg)
            pixels = np.stack([np.asarray(image, np.float64) for image in images])
            full_pixels = pixels if full_pixels is None else full_pixels
            moved = float(np.abs(pixels - full_pixels).mean())  # how far the images moved, 0-255
            scores = world.score(images, [p for p, _ in cells], references)
            ids = identity_values(scores)
            per_identity[label].append((float(np.mean(ids)) if ids else float("nan"),
                                        float(np.mean([s.prompt.score for s in scores])), moved))
        print(f"identity {identity} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    (args.out / "export.json").write_text(json.dumps(per_identity, indent=2))

    lines = [
        f"Measured on {cpu_name()}, shared; {args.identities} unseen identities × {len(prompts)} prompts × "
        f"{len(seeds)} seeds, training {cfg.train.steps} steps, band {list(cfg.sample.band)}, "
        f"{cfg.sample.steps} denoising steps ({cfg.sample.scheduler}); {time.perf_counter() - started:.0f} s.",
        "",
        "| concept | identity to the selfie | prompt score | Δ identity vs full | Δ prompt vs full | mean pixel change vs full (0-255) |",
        "|---|---|---|---|---|---|",
    ]
    full = np.asarray(per_identity["full"])
    for label, rows in per_identity.items():
        values = np.asarray(rows)
        delta = values - full
        name = "full (mapper(t) + bypass)" if label == "full" else f"exported, {label.split('-')[1]} segments (static, no bypass, γ 1)"
        lines.append(
            f"| {name} | {values[:, 0].mean():.3f} ± {values[:, 0].std():.3f} | {values[:, 1].mean():.1f} ± {values[:, 1].std():.1f} "
            f"| {'–' if label == 'full' else f'{delta[:, 0].mean():+.3f} ± {delta[:, 0].std():.3f}'} "
            f"| {'–' if label == 'full' else f'{delta[:, 1].mean():+.1f} ± {delta[:, 1].std():.1f}'} "
            f"| {'–' if label == 'full' else f'{values[:, 2].mean():.2f}'} |"
        )
    lines += ["", "± is the std over identities (each identity's mean over prompts × seeds); Δ is paired per identity.",
              f"Command: `python bench/toy_export.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--segments", default="2,3", help="segment counts to compare, comma-separated")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"first N of the {len(PROMPTS)} toy prompts")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--steps", type=int, help="training steps (default: the toy preset's)")
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its VAE and last checkpoint (default: the shipped assets/toy)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-export"))
    args = parser.parse_args()
    section = "## Export: full concept vs exported static approximation\n\n" + run(args)
    print(section)
    (args.out / "export.md").write_text(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
