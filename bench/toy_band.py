"""Which generation interval should the toy preset default to? (bench/RESULTS-toy.md, section 3)

For each of N unseen identities: the toy preset's default training on one selfie, then
8 prompts x 2 seeds at each interval, scored against the selfie and against 10 strangers'
selfies (same scene). Prints, per interval, mean +- std over identities of the likeness to the
person, to the strangers, their difference (paired per identity), and the prompt score; writes
each identity's figures to OUT/per-identity.csv, for paired comparisons between runs.

    python bench/toy_band.py --identities 6 --bands 300-800,100-950 [--set train.KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from toy_world import (FIRST, PROMPTS, SEEDS, World, _expand, _reference_stats, cpu_name,  # noqa: E402
                       identity_values, likeness_to_strangers, model_source, stranger_refs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--bands", default="300-800,100-950")
    parser.add_argument("--run", type=Path, help="a pretraining run folder (default: the shipped assets/toy)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-band"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a preset override for training and sampling, e.g. train.steps=600 (repeatable)")
    args = parser.parse_args()

    import numpy as np

    from studio.cli import parse_overrides

    args.out.mkdir(parents=True, exist_ok=True)
    bands = [tuple(int(x) for x in text.split("-")) for text in args.bands.split(",")]
    world = World({"model.source": model_source(args.run, args.out), **parse_overrides(args.set)})
    started = time.perf_counter()
    rows = {band: {"own": [], "strangers": [], "prompt": []} for band in bands}
    real = []  # per identity: its ground-truth renders' likeness to its selfie (same prompts and seeds)
    for k in range(args.identities):
        identity = FIRST + 100 + 10 * k  # not the ablation's identities
        selfie = world.selfie(identity, args.out)
        refs, real_same, _, _ = _reference_stats(world, identity, selfie, others=0)
        real.append(float(np.mean(real_same)))
        strangers = stranger_refs(world, identity, args.out)
        concept, _cfg = world.train(selfie)
        for band in bands:
            images = world.generate(concept, PROMPTS, SEEDS, band=band)
            prompts = _expand(PROMPTS, SEEDS)
            scores = world.score(images, prompts, refs)
            rows[band]["own"].append(float(np.mean(identity_values(scores) or [0.0])))
            rows[band]["strangers"].append(likeness_to_strangers(world, images, strangers)[0])
            rows[band]["prompt"].append(float(np.mean([s.prompt.score for s in scores])))
        print(f"[band] identity {identity} done", file=sys.stderr, flush=True)
    print(f"Machine: {cpu_name()}. {args.identities} unseen identities from {FIRST + 100}, "
          f"{len(PROMPTS)} prompts x {len(SEEDS)} seeds, toy preset training"
          f"{''.join(' --set ' + item for item in args.set)}; {time.perf_counter() - started:.0f} s.\n")
    with open(args.out / "per-identity.csv", "w") as f:  # for paired comparisons between runs
        f.write("identity,band,own,strangers,prompt,real_renders\n")
        for band, r in rows.items():
            for k in range(args.identities):
                f.write(f"{FIRST + 100 + 10 * k},{band[0]}-{band[1]},{r['own'][k]:.4f},{r['strangers'][k]:.4f},{r['prompt'][k]:.2f},{real[k]:.4f}\n")
    print(f"The person's own ground-truth renders (same prompts and seeds) score {np.mean(real):.3f} ± {np.std(real):.3f} "
          "to the selfie; the last column is each identity's likeness as a share of that (the goal is 0.8).\n")
    print("| interval | likeness to the person | to 10 strangers' selfies | person minus strangers (paired) | prompt score "
          "| likeness / real renders |")
    print("|---|---|---|---|---|---|")
    for band, r in rows.items():
        own, other, prompt = (np.asarray(r[key]) for key in ("own", "strangers", "prompt"))
        diff, share = own - other, own / np.asarray(real)
        print(f"| {band[0]}–{band[1]} | {own.mean():.3f} ± {own.std():.3f} | {other.mean():.3f} ± {other.std():.3f} | "
              f"{diff.mean():+.3f} ± {diff.std(ddof=1):.3f} | {prompt.mean():.1f} ± {prompt.std():.1f} | "
              f"{share.mean():.2f} ± {share.std():.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
