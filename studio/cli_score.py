"""``python -m studio score``: identity and prompt scores of images made anywhere.

The same scores the studio shows: identity similarity to the reference photos (the preset's
face backend) and the prompt score (the preset's prompt scorer: CLIP, or the toy world's
attribute classifiers). No backbone is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Score images for identity (against --reference photos) and, with --prompt, prompt fidelity.

example:
  python -m studio score --preset toy --reference me.png --prompt "a photo of {} on a beach" out/*.png --json
"""


def add_score_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("score", help="score images made anywhere", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="images to score")
    parser.add_argument("--preset", required=True, help="preset whose face backend and prompt scorer to use")
    parser.add_argument("--reference", action="append", default=[], type=Path, metavar="PHOTO",
                        help="a photo of the person (repeat for more); without it identity is not scored")
    parser.add_argument("--prompt", help="the prompt the images were made from ({} = the person)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting")
    parser.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from studio.cli import CliError, _load_config
    from studio.faces import load_photo
    from studio.metrics import TOY_PROMPT_MODEL, Scorer, default_clip_model

    cfg = _load_config(args)
    for path in [*args.images, *args.reference]:
        if not path.is_file():
            raise CliError(f"no such file: {path}")
    clip = cfg.metrics.clip_model
    clip = default_clip_model(cfg.model.source) if clip == "auto" else clip
    scorer = Scorer(cfg.face, clip, "cpu")
    references = scorer.embed_references([str(p) for p in args.reference])
    images = [load_photo(str(p), cfg.face.max_pixels)[0] for p in args.images]
    prompt = args.prompt or "{}"
    if args.prompt and clip == TOY_PROMPT_MODEL:
        from studio.toy.world import unknown_words

        unknown = unknown_words(args.prompt)
        if unknown:  # said, not silently dropped: the score is only about the words it knows
            print(f"note: the toy world does not know {', '.join(repr(w) for w in unknown)}; "
                  "the prompt score leaves them out", file=sys.stderr)
    scores = scorer.score(images, [prompt] * len(images), references, cfg.concept.super_category)
    rows = [
        {
            "image": str(path),
            "identity": s.identity.similarity,
            "face_found": s.identity.face_found,
            "prompt_score": s.prompt.score if args.prompt else None,
            "identity_model": s.identity.model,
            "prompt_model": s.prompt.model if args.prompt else None,
        }
        for path, s in zip(args.images, scores)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            ident = "no face" if not r["face_found"] else ("-" if r["identity"] is None else f"{r['identity']:.3f}")
            prompt_score = "-" if r["prompt_score"] is None else f"{r['prompt_score']:.1f}"
            print(f"{r['image']}\tidentity {ident}\tprompt {prompt_score}")
    return 0
