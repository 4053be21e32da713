"""Which generation interval should the toy preset default to? (bench/RESULTS-toy.md, section 3)

For each of N unseen identities: the toy preset's default training on one selfie, then
8 prompts x 2 seeds at each interval, scored against the selfie and against 10 strangers'
selfies (same scene). Prints, per interval, mean +- std over identities of the likeness to the
person, to the strangers, their difference (paired per identity), and the prompt score; writes
each identity's figures to OUT/per-identity.csv, for paired comparisons between runs.

    python bench/toy_band.py --identities 6 --bands 300-800,100-950 [--set train.KEY=VALUE ...]

Few-shot: ``--photos 3`` trains on the selfie and two more photos of the person (``--more pose``:
the selfie's scene with other framing; ``--more scenes``: other settings and expressions). The
images are still scored against the one selfie, so the figures pair with a one-photo run.
``--against OTHER/per-identity.csv`` prints this run minus that one, paired per identity.
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
    parser.add_argument("--photos", type=int, default=1, help="photos of the person to train on (1-5)")
    parser.add_argument("--more", choices=("pose", "scenes"), default="pose", help="what the further photos vary")
    parser.add_argument("--against", type=Path, help="another run's per-identity.csv, for paired differences")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a preset override for training and sampling, e.g. train.steps=600 (repeatable)")
    args = parser.parse_args()
    if not 1 <= args.photos <= 5:
        parser.error(f"--photos must be 1 to 5, got {args.photos}")

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
        concept, _cfg = world.train([selfie, *world.more_selfies(identity, args.out, args.photos - 1, args.more)])
        for band in bands:
            images = world.generate(concept, PROMPTS, SEEDS, band=band)
            prompts = _expand(PROMPTS, SEEDS)
            scores = world.score(images, prompts, refs)
            rows[band]["own"].append(float(np.mean(identity_values(scores) or [0.0])))
            rows[band]["strangers"].append(likeness_to_strangers(world, images, strangers)[0])
            rows[band]["prompt"].append(float(np.mean([s.prompt.score for s in scores])))
        print(f"[band] identity {identity} done", file=sys.stderr, flush=True)
    print(f"Machine: {cpu_name()}. {args.identities} unseen identities from {FIRST + 100}, "
          f"{len(PROMPTS)} prompts x {len(SEEDS)} seeds, toy preset training on {args.photos} photo(s)"
          f"{f' (further ones: {args.more})' if args.photos > 1 else ''}"
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
    if args.against:
        print_paired(args.out / "per-identity.csv", args.against)
    return 0


def print_paired(this: Path, other: Path) -> None:
    """This run minus ``other``, per identity and interval both measured: mean ± standard error."""
    import csv

    import numpy as np

    def read(path: Path) -> dict:
        with open(path) as f:
            return {(row["identity"], row["band"]): row for row in csv.DictReader(f)}

    mine, theirs = read(this), read(other)
    shared = sorted(mine.keys() & theirs.keys())
    print(f"\nPaired against {other} ({len(shared)} identity × interval pairs), this run minus that one, "
          "mean ± standard error:\n")
    print("| interval | identities | likeness | to strangers | prompt score |")
    print("|---|---|---|---|---|")
    for band in sorted({b for _, b in shared}):
        keys = [k for k in shared if k[1] == band]
        cells = []
        for column in ("own", "strangers", "prompt"):
            diff = np.array([float(mine[k][column]) - float(theirs[k][column]) for k in keys])
            error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            cells.append(f"{diff.mean():+.3f} ± {error:.3f}" if column != "prompt" else f"{diff.mean():+.1f} ± {error:.1f}")
        print(f"| {band} | {len(keys)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
