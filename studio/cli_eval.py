"""``python -m studio eval``: score a concept over prompts × seeds × settings (docs/ALGORITHM.md, "Evaluation").

For every setting (generation band × tandem balance) it generates each prompt with each
seed, scores identity against reference photos and prompt fidelity with CLIP, and writes

- ``scores.csv``: one row per prompt × seed × setting (columns in :data:`CSV_COLUMNS`);
- ``grid.png``: rows = settings, columns = prompt × seed, with labels;

then prints the mean and spread (population std) per setting. Also runnable as
``python -m studio.cli_eval``.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from studio.config import EVAL_PROMPTS_FILE, ConfigError, StudioConfig, check_band, load_preset

if TYPE_CHECKING:
    from studio.sweep import SweepPoint


CSV_COLUMNS = (
    "prompt",
    "seed",
    "band_lo",
    "band_hi",
    "balance",
    "identity",
    "face_found",
    "prompt_score",
    "identity_model",
    "prompt_model",
)
DEFAULT_SEEDS = (0, 1, 2)
DESCRIPTION = """\
Score a concept: identity similarity to reference photos (face backend) and prompt fidelity
(CLIPScore) for every prompt × seed × setting, where a setting is one generation band and one
tandem balance. Writes scores.csv (one row per prompt × seed × setting) and grid.png, and
prints the mean ± std per setting.

example:
  python -m studio eval --preset sd15 --concept me.safetensors --seeds 1 2 3 --out eval/ \\
      --band 200 600 --band 400 800 --balance 0.8 1.0 1.2 --reference photos/*.jpg
"""
NO_REFERENCE_NOTE = (
    "No --reference photos given: identity similarity cannot be scored (a concept file stores a "
    "CLIP image embedding, not the photos). The identity column stays empty; face_found is still reported."
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from studio.cli import add_model_arguments

    add_model_arguments(parser, "preset name or YAML path (the backbone the concept was trained on; default tiny)")
    parser.add_argument("--concept", required=True, type=Path, help="the concept .safetensors file to evaluate")
    parser.add_argument("--prompts", type=Path, default=EVAL_PROMPTS_FILE,
                        help="text file, one prompt per line with {} for the person (default: presets/eval_prompts.txt)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="seeds per prompt (default: 0 1 2)")
    parser.add_argument("--out", required=True, type=Path, help="folder for scores.csv and grid.png")
    parser.add_argument("--band", type=int, nargs=2, action="append", metavar=("LO", "HI"),
                        help="generation band; repeat to sweep several (default: the preset's sample.band)")
    parser.add_argument("--balance", type=float, nargs="+", metavar="G",
                        help="tandem balance value(s) to sweep (default: the preset's sample.balance)")
    parser.add_argument("--reference", type=Path, nargs="+", default=[], metavar="IMG",
                        help="reference photos of the person, for identity similarity")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's sample.steps)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the preset's sample.guidance_scale)")
    parser.add_argument("--scheduler", help="scheduler name (default: the preset's sample.scheduler)")
    parser.add_argument("--clip", help="CLIP for prompt scores: hub id, folder or 'tiny' "
                        "(default: tiny on the tiny backbone, else openai/clip-vit-large-patch14)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a style LoRA (.safetensors) and its strength, e.g. ink.safetensors:0.7 (repeatable)")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command; it runs :func:`main_eval`."""
    parser = subparsers.add_parser("eval", help="score a concept: identity and prompt similarity over prompts × seeds × settings",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=main_eval)
    return parser


def _settings(args: argparse.Namespace, cfg: StudioConfig) -> tuple[list[tuple[int, int]], list[float]]:
    bands = [check_band(b, "--band") for b in (args.band or [cfg.sample.band])]
    balances = list(args.balance or [cfg.sample.balance])
    if any(not g > 0 for g in balances):
        raise ConfigError(f"--balance values must be > 0, got {balances}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    return bands, balances


def _make_output_folder(path: Path) -> None:
    from studio.cli import CliError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot write to --out {path}: {err.strerror or err}") from None


def main_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args``; 0 on success. User errors (StudioError) go to the
    CLI's dispatcher (studio.cli.main), which prints them as one line with exit status 2."""
    # Heavy imports here: `python -m studio --help` stays fast.
    from studio.backbone import get_backbone
    from studio.cli import check_model, model_overrides
    from studio.concept_file import load_concept, read_concept_info
    from studio.faces import PhotoError
    from studio.metrics import Scorer
    from studio.sampler import GenerationSettings, Sampler
    from studio.sweep import grid_image, read_prompt_file, sweep

    cfg = load_preset(args.preset or ("sd15" if args.model else "tiny"), **model_overrides(args))
    bands, balances = _settings(args, cfg)
    prompts = read_prompt_file(args.prompts)
    missing = [str(p) for p in args.reference if not p.is_file()]
    if missing:
        raise PhotoError(f"reference photo not found: {', '.join(missing)}")
    if not args.concept.is_file():
        raise ConfigError(f"concept file not found: {args.concept}")
    check_model(cfg, read_concept_info(args.concept).get("backbone"))  # before any weight loads
    _make_output_folder(args.out)
    backbone = get_backbone(cfg.model)
    concept = load_concept(args.concept, backbone)
    from studio.lora import applied, uses_from_arguments

    loras = uses_from_arguments(args.lora, backbone)
    seeds = list(args.seeds)
    generation = GenerationSettings.from_config(
        cfg, num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler or None,
        seeds=seeds, band=bands[0], balance=balances[0],
    )
    sampler = Sampler(backbone)
    # Cheap mistakes (scheduler, seeds, steps, prompts, size) before CLIP and the face model load.
    sampler.check_inputs(concept, prompts, **generation.kwargs())
    scorer = Scorer.for_backbone(backbone, cfg.face, args.clip or cfg.metrics.clip_model)
    models = f"identity: {scorer.analyzer.name}, prompt: {scorer.clip.name}"  # loads both: fail here, early
    references = scorer.embed_references(args.reference)

    if not references:
        print(NO_REFERENCE_NOTE, file=sys.stderr)
    total = len(bands) * len(balances)
    print(
        f"Evaluating {args.concept.name} on {backbone.describe()}: {len(prompts)} prompts × {len(seeds)} seeds × "
        f"{total} settings; {models}",
        file=sys.stderr,
    )
    points: list[SweepPoint] = []
    started = time.perf_counter()
    finished_points = sweep(
        sampler,
        concept,
        prompts,
        seeds,
        bands,
        balances,
        scorer,
        references,
        settings=generation,
    )
    with applied(backbone, loras):  # style LoRAs for this run only (studio/lora.py); a PromptError goes to the dispatcher
        for point in finished_points:
            points.append(point)
            print(f"[{len(points)}/{total}] {point.label} done ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

    csv_path = write_scores_csv(args.out / "scores.csv", points, prompts, seeds)
    grid_path = args.out / "grid.png"
    grid_image(points, prompts, seeds).save(grid_path)
    print(format_table(points))
    print(f"Wrote {csv_path} and {grid_path}", file=sys.stderr)
    return 0


def write_scores_csv(path: Path, points: Sequence[SweepPoint], prompts: Sequence[str], seeds: Sequence[int]) -> Path:
    """One row per prompt × seed × setting; ``identity`` is empty when it could not be scored."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for point in points:
            cells = [(prompt, seed) for prompt in prompts for seed in seeds]
            for (prompt, seed), scores in zip(cells, point.scores, strict=True):
                similarity = scores.identity.similarity
                writer.writerow(
                    dict(
                        prompt=prompt,
                        seed=seed,
                        band_lo=point.band[0],
                        band_hi=point.band[1],
                        balance=point.balance,
                        identity="" if similarity is None else f"{similarity:.4f}",
                        face_found=scores.identity.face_found,
                        prompt_score=f"{scores.prompt.score:.4f}",
                        identity_model=scores.identity.model,
                        prompt_model=scores.prompt.model,
                    )
                )
    return path


def format_table(points: Sequence[SweepPoint]) -> str:
    """Mean ± std of identity and prompt score, and the face rate, one line per setting."""
    header = f"{'band':>9}  {'balance':>7}  {'identity':>13}  {'faces':>5}  {'prompt':>12}  {'n':>4}"
    lines = [header, "-" * len(header)]
    for p in points:
        identity = "-" if p.mean_identity is None else f"{p.mean_identity:.3f} ± {p.identity_std:.3f}"
        lines.append(
            f"{f'{p.band[0]}-{p.band[1]}':>9}  {p.balance:>7.2f}  {identity:>13}  {p.face_rate:>5.0%}  "
            f"{f'{p.mean_prompt:.2f} ± {p.prompt_std:.2f}':>12}  {len(p.scores):>4}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.cli_eval", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    from studio.cli import run_command

    return run_command(main_eval, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
