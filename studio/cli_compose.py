"""``python -m studio compose``: several people in one picture (docs/COMPOSE.md).

People are numbered in the order their ``--concept`` / ``--photo`` options appear: the first
is ``{0}`` in the prompt, the next ``{1}``. ``--reference 0=me.png`` adds a photo to a concept
person (reference-aware self-attention on top of the trained identity).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Compose trained concepts and/or photos into one picture; {0}, {1} in the prompt are the people
in the order given.

examples:
  python -m studio compose --preset toy --concept a.safetensors --concept b.safetensors \\
      --prompt "a photo of {0} and {1} on a beach" --seed 3 --out pair.png
  python -m studio compose --preset toy --concept a.safetensors --photo friend.png \\
      --prompt "{0} and {1} in a forest" --boxes left-right --out pair.png
"""


class _AddPerson(argparse.Action):
    """--concept / --photo append (kind, path) to one list, keeping the command line's order."""

    def __call__(self, parser, namespace, values, option_string=None):
        people = list(getattr(namespace, self.dest, None) or [])
        people.append((self.const, Path(values)))
        setattr(namespace, self.dest, people)


def add_compose_parser(subparsers: Any) -> None:
    from studio.cli import add_model_arguments

    parser = subparsers.add_parser("compose", help="several people in one picture", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "preset name or YAML path (the model the concepts were trained on)")
    parser.add_argument("--concept", dest="people", action=_AddPerson, const="concept", metavar="C.safetensors",
                        help="a trained person (repeatable; numbered in order with --photo)")
    parser.add_argument("--photo", dest="people", action=_AddPerson, const="photo", metavar="PHOTO",
                        help="a person given by one photo only (repeatable)")
    parser.add_argument("--reference", action="append", default=[], metavar="N=PHOTO",
                        help="add a photo to person N's concept (reference-aware self-attention)")
    parser.add_argument("--prompt", required=True, help="e.g. '{0} and {1} at a café'")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.png",
                        help="output image (several seeds: OUT_0.png, ...); the regions go to OUT_regions.png")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images, seeds seed, seed+1, ... (default 1)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's sample.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", help="a scheduler name, as for generate")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--size", type=int, help="picture height in pixels (default: the preset's image size); two or more "
                        "people get a picture compose.aspect times as wide (--set compose.aspect=1: a square)")
    parser.add_argument("--mode", choices=("regions", "naive"), default="regions",
                        help="regions: each person's pixels see only their own tokens (default); naive: all tokens in one prompt")
    parser.add_argument("--boxes", action="append", metavar="BOX",
                        help="'left-right' (people side by side), or one 'x0,y0,x1,y1' (fractions) per person, in order")
    parser.add_argument("--rsa-weight", type=float, help="weight of the photos' face pixels (0 = no reference attention)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting, e.g. compose.layout_fraction=0.4")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a style LoRA (.safetensors) and its strength, e.g. ink.safetensors:0.7 (repeatable)")
    parser.set_defaults(func=run_compose)


def parse_boxes(values: list[str] | None, count: int) -> list[tuple[float, ...]] | None:
    """--boxes values -> one (x0, y0, x1, y1) per person, or None (located automatically)."""
    from studio.cli import CliError
    from studio.compose import side_boxes

    if not values:
        return None
    if len(values) == 1 and values[0].strip().lower() in ("left-right", "side-by-side"):
        return side_boxes(count)
    boxes = []
    for text in values:
        try:
            box = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise CliError(f"--boxes expects 'left-right' or four numbers x0,y0,x1,y1; got {text!r}") from None
        if len(box) != 4:
            raise CliError(f"--boxes expects four numbers x0,y0,x1,y1 per person; got {text!r}")
        boxes.append(box)
    return boxes


def _parse_references(values: list[str], count: int) -> dict[int, Path]:
    from studio.cli import CliError

    found: dict[int, Path] = {}
    for text in values:
        index, sep, path = text.partition("=")
        if not sep or not index.strip().isdigit():
            raise CliError(f"--reference expects N=PHOTO (N the person's number, e.g. 0=me.png), got {text!r}")
        if int(index) >= count:
            raise CliError(f"--reference {text}: there is no person {{{index}}} (people: {count})")
        found[int(index)] = Path(path)
    return found


def _prepared_reference(path: Path, cfg):
    """The first usable face of a photo as a compose Reference (CliError with the reason otherwise)."""
    from studio.cli import CliError
    from studio.compose import Reference
    from studio.faces import get_face_analyzer, prepare

    if not path.is_file():
        raise CliError(f"no such photo: {path}")
    prepared = prepare([str(path)], cfg.face, get_face_analyzer(cfg.face))
    if not prepared.photos:
        reason = prepared.reports[0].error if prepared.reports else "no face found"
        raise CliError(f"the photo {path} cannot be used: {reason}")
    return Reference.from_prepared(prepared.photos[0])


def run_compose(args: argparse.Namespace) -> int:
    from studio.cli import (
        EXIT_OK, IMAGE_SUFFIXES, CliError, _backbone, _check_output, _load_config, _output_paths, _progress,
        _save_image, check_model,
    )

    people_args = args.people or []
    _check_output(args.out, IMAGE_SUFFIXES, "the output image")
    if not people_args:
        raise CliError("give the people: --concept C.safetensors and/or --photo PHOTO, one option per person")
    if args.num_images < 1 or args.seed < 0:
        raise CliError("--num-images must be >= 1 and --seed >= 0")
    for kind, path in people_args:
        if not path.is_file():
            raise CliError(f"no such {kind} file: {path}")
    extra = {"compose.rsa_weight": args.rsa_weight} if args.rsa_weight is not None else {}
    cfg = _load_config(args, extra)
    count = len(people_args)
    boxes = parse_boxes(args.boxes, count)
    references = _parse_references(args.reference, count)
    from studio.compose import check_template

    check_template(args.prompt, count, cfg.compose.max_people)  # cheap: before any weight loads
    check_model(cfg)

    from studio.compose import Composer, Person
    from studio.concept_file import load_concept, read_concept_info
    from studio.lora import applied, uses_from_arguments
    from studio.sampler import GenerationSettings, Sampler

    for kind, path in people_args:
        if kind == "concept":
            check_model(cfg, read_concept_info(path).get("backbone"))
    backbone = _backbone(cfg)
    loras = uses_from_arguments(args.lora, backbone)  # checked before any denoising
    people = []
    for index, (kind, path) in enumerate(people_args):
        if kind == "concept":
            reference = _prepared_reference(references[index], cfg) if index in references else None
            people.append(Person(concept=load_concept(path, backbone), reference=reference))
        else:
            if index in references:
                raise CliError(f"person {{{index}}} is already a photo; --reference adds a photo to a concept")
            people.append(Person(reference=_prepared_reference(path, cfg)))
    composer = Composer(Sampler(backbone), cfg.compose)
    height, width = composer.canvas(args.size or cfg.image_size, len(people))
    settings = GenerationSettings.from_config(
        cfg, negative_prompt=args.negative, num_inference_steps=args.steps or None, guidance_scale=args.guidance,
        seeds=list(range(args.seed, args.seed + args.num_images)), height=height, width=width,
        scheduler=args.scheduler or None,
    ).kwargs()
    composer.check_inputs(people, args.prompt, args.mode, boxes, **settings)
    with _progress(None, "composing") as bar, applied(backbone, loras):
        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = composer(people, args.prompt, mode=args.mode, boxes=boxes, callback_on_step_end=on_step, **settings)
    paths = _output_paths(args.out, len(result.images))
    for image, overlay, path, image_settings in zip(result.images, result.overlays, paths, result.settings):
        _save_image(image, path, image_settings)
        overlay.save(path.with_name(f"{path.stem}_regions{path.suffix}"))
    passes = result.settings[0]["unet_passes_per_step"]
    for path, caption in zip(paths, result.captions):
        print(f"{path}: {caption}")
    print(f"cost: {passes} UNet pass{'es' if passes > 1 else ''} per step (1 + one per reference photo)")
    return EXIT_OK
