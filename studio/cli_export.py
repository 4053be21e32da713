"""``python -m studio export``: a concept as files for A1111/Forge, ComfyUI and diffusers (docs/EXPORT.md)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Export a concept for other tools: one textual-inversion file per segment of the band, the
A1111/Forge prompt with [from:to:when] prompt editing for the sampler and step count given,
a ComfyUI workflow (API format) with timestep-range conditioning, and a diffusers script, in
one zip with a README of how to use each and what is lost.

example:
  python -m studio export --preset sd15 --concept me.safetensors --format all --out exports/ \\
      --prompt "a photo of {} as a chef" --scheduler dpmsolver++ --steps 30 --segments 3
"""


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    from studio.cli import add_model_arguments

    parser = subparsers.add_parser("export", help="export a concept for A1111, ComfyUI, diffusers", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "preset name or YAML path (the model the concept was trained on)")
    parser.add_argument("--concept", type=Path, required=True, metavar="C.safetensors", help="the concept file")
    parser.add_argument("--format", default="all", choices=("a1111", "comfyui", "diffusers", "all"))
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for NAME-export.zip")
    parser.add_argument("--name", help="trigger word (default: from the concept's file name)")
    parser.add_argument("--segments", type=int, default=2, help="static embeddings over the band (default 2)")
    parser.add_argument("--band", type=int, nargs=2, metavar=("LO", "HI"), help="band to cut (default: the concept's training band)")
    parser.add_argument("--prompt", default="a photo of {}", help="prompt the A1111/ComfyUI files are written for ({} = the person)")
    parser.add_argument("--negative", help="negative prompt (default: the preset's)")
    parser.add_argument("--scheduler", help="the studio's scheduler whose step table A1111's switches follow (default: the preset's)")
    parser.add_argument("--steps", type=int, help="step count the A1111 prompt is computed for (default: the preset's sample.steps)")
    parser.add_argument("--guidance", type=float, help="guidance scale written into the ComfyUI workflow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image side written into the ComfyUI workflow")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting")
    parser.set_defaults(func=run_export)
    return parser


def default_name(path: Path) -> str:
    """A trigger word from a file name: 'Alice Smith.safetensors' -> 'alice-smith'."""
    name = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:40]
    return name or "concept"


def run_export(args: argparse.Namespace) -> int:
    from studio.cli import CliError, _backbone, _load_config, check_model

    if not args.concept.is_file():
        raise CliError(f"no concept file at {args.concept}")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} is a file; give a folder")
    cfg = _load_config(args)
    from studio.concept_file import load_concept, read_concept_info
    from studio.export import ExportSettings, bundle_files, check_name, static_export, write_bundle

    name = check_name(args.name or default_name(args.concept))
    check_model(cfg, read_concept_info(args.concept).get("backbone"))
    backbone = _backbone(cfg)
    concept = load_concept(args.concept, backbone)
    export = static_export(concept, name, args.segments, tuple(args.band) if args.band else None)
    settings = ExportSettings(
        prompt=args.prompt,
        negative_prompt=cfg.sample.negative_prompt if args.negative is None else args.negative,
        scheduler=args.scheduler or cfg.sample.scheduler,
        num_inference_steps=args.steps or cfg.sample.steps,
        guidance_scale=cfg.sample.guidance_scale if args.guidance is None else args.guidance,
        seed=args.seed,
        size=args.size,
    )
    files = bundle_files(backbone, concept, export, settings, args.format)
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_bundle(files, args.out / f"{name}-export.zip")
    print(f"{path}: {len(export.embeddings)} embeddings ({', '.join(export.embeddings)}) over band {list(export.band)}")
    if "a1111/prompt.txt" in files:
        print(files["a1111/prompt.txt"].decode().splitlines()[0])
    return 0
