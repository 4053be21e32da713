"""``python -m studio prepare IMG [IMG ...]``: detect, align and mask faces, write the crops.

Writes, per usable photo, ``NN_<stem>_crop.png`` (the aligned crop), ``NN_<stem>_mask.png``
(the soft mask, grey) and ``NN_<stem>_overlay.png`` (crop with the mask tinted) to ``--out``.
With ``--json`` stdout carries exactly one JSON object and nothing else::

    {"backend": "dlib", "photos": [{"path", "ok", "faces", "box", "warnings", "error"}, ...],
     "identity_distances": [[...]]}   # over the usable photos, in input order

Exit status 0 when at least one photo is usable, 1 when none is, 2 for a bad preset.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_OUT = Path("outputs") / "prepare"
JSON_PHOTO_KEYS = ("path", "ok", "faces", "box", "warnings", "error")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMG", help="photos of one person (JPEG, PNG, WebP, ...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for crops and masks (default: {DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout instead of text")
    parser.add_argument("--preset", default=None, help="preset name or YAML path whose face settings to use (default: built-in)")


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``prepare`` sub-command on an ``ArgumentParser.add_subparsers()`` object;
    the parsed namespace's ``func`` runs it and returns the exit status."""
    parser = subparsers.add_parser(
        "prepare", help="detect, align and mask the face in each photo",
        description="Detect the face in each photo, write the aligned crop and its soft mask, "
                    "and report problems photo by photo.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_prepare)
    return parser


def _save_outputs(prepared_set: Any, out_dir: Path) -> list[Path]:
    written = []
    for index, photo in enumerate(prepared_set.photos):
        stem = f"{index:02d}_{Path(photo.name).stem}"
        files = {
            out_dir / f"{stem}_crop.png": photo.crop,
            out_dir / f"{stem}_mask.png": Image.fromarray((photo.mask * 255).round().astype(np.uint8), "L"),
            out_dir / f"{stem}_overlay.png": photo.mask_overlay(),
        }
        for path, image in files.items():
            image.save(path)
            written.append(path)
    return written


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` for parsed arguments; returns the exit status."""
    from studio.cli import CliError
    from studio.config import FaceConfig, load_preset
    from studio.faces import PhotoError, prepare

    cfg = load_preset(args.preset).face if args.preset else FaceConfig()  # a ConfigError: the dispatcher says it
    # Check the output folder before the (slow) face work, not after it.
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot write to --out {args.out}: {err.strerror or err}") from None

    # Libraries may print to stdout; with --json it must hold the JSON object alone.
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    prepared_set, reports, backend, error = None, (), "", None
    with redirect:
        try:
            prepared_set = prepare([str(p) for p in args.images], cfg)
            reports, backend = prepared_set.reports, prepared_set.backend
        except PhotoError as err:
            reports, error = err.reports, str(err)
            backend = reports[0].backend if reports else cfg.backend
        try:
            written = _save_outputs(prepared_set, args.out) if prepared_set is not None else []
        except OSError as err:
            raise CliError(f"cannot write the crops to {args.out}: {err.strerror or err}") from None

    if args.json:
        distances = prepared_set.identity_distances if prepared_set is not None else np.zeros((0, 0))
        result = {
            "backend": backend,
            "photos": [{key: report.to_dict()[key] for key in JSON_PHOTO_KEYS} for report in reports],
            "identity_distances": np.round(distances.astype(float), 4).tolist(),
        }
        print(json.dumps(result))
    else:
        for report in reports:
            status = "ok " if report.ok else "BAD"
            print(f"[{status}] {report.path or report.name}: " + (report.error or f"{report.faces} face(s), box {report.box}"))
            for note in report.warnings:
                print(f"      warning: {note}")
        if prepared_set is not None:
            print(prepared_set.summary())
            print(f"wrote {len(written)} files to {args.out}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main_prepare(argv: list[str]) -> int:
    """Entry point for ``python -m studio prepare ARGS`` (``argv`` without the sub-command)."""
    parser = argparse.ArgumentParser(prog="python -m studio prepare", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    from studio.cli import run_command

    return run_command(run_prepare, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_prepare(sys.argv[1:]))
