"""Command line: ``python -m studio {train,generate,prepare,eval,compose} ...``.

Expected problems (bad photo, bad prompt, foreign concept file, missing weights, ...) end with
one ``error: ...`` line on stderr and exit status 2, never a traceback (they are the StudioErrors,
see studio/errors.py); anything else is a bug, logged with its traceback, exit status 1. Every
sub-command goes through :func:`run_command`. A training run that fails on its own (out of
memory, loss not finite) exits with 1. Progress bars go to stderr, results to stdout.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import StudioError, one_line

if TYPE_CHECKING:
    from PIL.Image import Image

    from studio.backbone import Backbone
    from studio.config import StudioConfig

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
_LOG = logging.getLogger("studio.cli")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class CliError(StudioError):
    """A user error found by the command line itself (bad argument value, unwritable output)."""


# --------------------------------------------------------------------------- shared helpers
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "sample.band=[200, 900]"]`` -> {"train.lr": 0.001, ...} (YAML values)."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set expects key=value (e.g. train.lr=1e-3), got {pair!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        overrides[key.strip()] = value
    return overrides


def add_model_arguments(parser: argparse.ArgumentParser, preset_help: str) -> None:
    """--preset, --model and --image-encoder, shared by every command that loads a model."""
    parser.add_argument("--preset", help=f"{preset_help} (default: sd15 when --model is given)")
    parser.add_argument("--model", metavar="SOURCE",
                        help="base model: hub id, diffusers folder (fp16 variants too) or single .safetensors file")
    parser.add_argument("--image-encoder", metavar="SOURCE",
                        help="CLIP image encoder of the image bypass: hub id or folder, or 'none' to train without "
                             "the bypass (default: the preset's model.image_encoder)")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "model", None):
        overrides["model.source"] = args.model
    encoder = getattr(args, "image_encoder", None)
    if encoder:
        off = encoder.lower() in ("none", "null", "off")
        overrides["model.image_encoder"] = None if off else encoder
        if off:
            overrides["concept.use_bypass"] = False
    return overrides


def preset_name(args: argparse.Namespace) -> str:
    if args.preset:
        return args.preset
    if getattr(args, "model", None):
        return "sd15"  # a real model: the real-model preset's settings, not tiny's
    raise CliError("give --preset (tiny, sd15, ... or a YAML file) or --model")


def _load_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> StudioConfig:
    from studio.config import load_preset

    overrides = {**parse_overrides(args.set or []), **model_overrides(args), **(extra or {})}
    return load_preset(preset_name(args), **overrides)


def check_model(cfg: StudioConfig, concept_backbone: dict[str, Any] | None = None) -> None:
    """Before any weight loads (and before torch is imported): the image encoder, the model's files and
    architecture, and whether a concept trained on ``concept_backbone`` can run on it."""
    from studio.weights import concept_mismatch, expected_fingerprint

    expected = expected_fingerprint(cfg.model)
    problem = concept_mismatch(concept_backbone, expected) if concept_backbone else None
    if problem:
        from studio.concept_file import ConceptFileError

        raise ConceptFileError(problem)


def _backbone(cfg: StudioConfig) -> Backbone:
    from studio.backbone import get_backbone

    backbone = get_backbone(cfg.model)
    if backbone.is_random:
        print("note: the tiny preset has random weights: its images are noise (it shows the machinery, not a likeness).")
    for note in backbone.notes:
        print(f"note: {note}")
    return backbone


def _check_output(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    """Fail before any work when the output cannot be written where asked."""
    if path.suffix.lower() not in suffixes:
        raise CliError(f"{what} {path} must end with {' or '.join(suffixes)}")
    if path.is_dir():
        raise CliError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise CliError(f"the folder {path.parent} for {what} {path} does not exist")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------- train
def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="learn a concept from photos of one person",
        description="Prepare the face in each photo, train the identity mapper and save the concept.",
    )
    add_model_arguments(parser, "preset name (tiny, sd15, ...) or YAML path")
    parser.add_argument("--image", action="append", required=True, metavar="IMG", help="a photo of the person (repeat for more)")
    parser.add_argument("--out", type=Path, required=True, metavar="CONCEPT.safetensors", help="where to save the concept")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the preset's train.steps)")
    parser.add_argument("--seed", type=int, help="training seed (default: the preset's train.seed)")
    parser.add_argument("--preview-dir", type=Path, help="save the preview images here (previews are off without it)")
    parser.add_argument("--checkpoint", type=Path, metavar="STATE.safetensors",
                        help="save the training state here every --checkpoint-every steps, on Ctrl-C and at the end")
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints (default 50)")
    parser.add_argument("--resume", type=Path, metavar="FILE.safetensors",
                        help="continue a run from its checkpoint or from the concept it saved (same photos and "
                             "settings; --steps may grow); later checkpoints go to a resumed checkpoint file "
                             "unless --checkpoint says otherwise")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting, e.g. train.lr=1e-3")
    parser.set_defaults(func=run_train)
    return parser


class _StopRequest:
    """The first Ctrl-C asks training to stop after the current step (the state is then
    consistent and can be saved); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _StopRequest:
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    _check_output(args.out, (".safetensors",), "the concept file")
    extra: dict[str, Any] = {}
    if args.steps is not None:
        extra["train.steps"] = args.steps
    if args.seed is not None:
        extra["train.seed"] = args.seed
    if args.preview_dir is None:
        extra["train.preview_every"] = 0  # previews cost generation time nobody would see
    cfg = _load_config(args, extra)
    check_model(cfg)  # a .ckpt, an SDXL folder, a missing image encoder: said before torch is imported

    from studio.concept import describe
    from studio.concept_file import (
        CHECKPOINT_FORMAT,
        load_training_state,
        read_concept_info,
        save_checkpoint,
        save_concept,
    )
    from studio.events import PreviewReady, RolledBack, TrainingFailed, TrainingFinished, TrainingStep
    from studio.faces import prepare
    from studio.trainer import TrainingPhoto
    from studio.training import TrainingRun

    if args.preview_dir is not None and not args.preview_dir.is_dir():
        raise CliError(f"the preview folder {args.preview_dir} does not exist")
    # bad file: fail before any work
    saved_state = load_training_state(args.resume) if args.resume is not None else None
    resumed_info = read_concept_info(args.resume) if saved_state is not None else {}
    resumed_checkpoint = resumed_info.get("format") == CHECKPOINT_FORMAT
    if resumed_info.get("backbone"):
        check_model(cfg, resumed_info["backbone"])  # another model's width: said before the weights load
    checkpoint_path = args.checkpoint or (args.resume if resumed_checkpoint else None)
    if checkpoint_path is not None:
        _check_output(checkpoint_path, (".safetensors",), "the checkpoint")
        if checkpoint_path.resolve() == args.out.resolve():
            raise CliError("the checkpoint and the concept need two different files")
    if args.checkpoint_every < 1:
        raise CliError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if saved_state is not None and int(saved_state["step"]) >= cfg.train.steps:
        raise CliError(
            f"{args.resume} is already at step {saved_state['step']} of {cfg.train.steps}; "
            f"pass --steps with more than {saved_state['step']} to train further"
        )
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        raise CliError(f"photo not found: {', '.join(missing)}")

    prepared = prepare([str(path) for path in args.image], cfg.face)
    print(prepared.summary())
    for report in prepared.reports:
        for warning in report.warnings:
            print(f"warning: {report.name}: {warning}", file=sys.stderr)
    photos = [TrainingPhoto.from_prepared(photo) for photo in prepared.photos]

    backbone = _backbone(cfg)
    stop = _StopRequest()
    run = TrainingRun(backbone, cfg, photos, state=saved_state, stop_requested=lambda: stop.requested)
    trainer = run.build()  # a StateMismatch names what differs from the resumed run
    if saved_state is not None:
        print(f"resumed {args.resume} at step {trainer.step} of {cfg.train.steps}")

    def save_state() -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, run.end_state())

    started, last_loss, concept, stopped = time.perf_counter(), float("nan"), None, False
    last_cgdr = float("nan")
    with _progress(cfg.train.steps, "training") as bar, stop:
        bar.update(trainer.step)
        for event in run.events():
            if isinstance(event, TrainingStep):
                last_loss, last_cgdr = event.loss, event.cgdr_loss
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.loss:.4f}", **({"cgdr": f"{event.cgdr_loss:.4f}"} if cfg.train.cgdr_weight else {}))
                if event.step % args.checkpoint_every == 0:
                    save_state()
                if run.stop_lands_now() and event.step < cfg.train.steps:
                    stopped = True
                    break  # between steps: the trainer is consistent
            elif isinstance(event, RolledBack):
                bar.write(f"warning: step {event.step}: {event.reason}; went back to step {event.restored_step}", file=sys.stderr)
            elif isinstance(event, PreviewReady) and args.preview_dir is not None:
                for index, image in enumerate(event.images):
                    image.save(args.preview_dir / f"step{event.step:05d}_{index}.png")
            elif isinstance(event, TrainingFailed):
                bar.close()
                save_state()  # the last good state: rolled back or unchanged by the failed step
                print(f"error: training failed at step {event.step}: {event.message}", file=sys.stderr)
                return EXIT_FAILED
            elif isinstance(event, TrainingFinished):
                concept = event.concept
    if stopped:
        concept = run.stopped_event().concept
    if concept is None:
        print("error: training ended without a result", file=sys.stderr)
        return EXIT_FAILED
    save_state()
    save_concept(concept, args.out, training_state=run.end_state())  # the concept alone can go on later
    seconds = time.perf_counter() - started
    size_kb = args.out.stat().st_size / 1024
    cgdr = f" (class-guided regularization {last_cgdr:.4f})" if cfg.train.cgdr_weight else ""
    if stopped:
        print(f"stopped at step {concept.steps_done} of {cfg.train.steps} after {seconds:.1f} s, loss {last_loss:.4f}{cgdr}")
    else:
        print(f"trained {concept.steps_done} steps in {seconds:.1f} s, final loss {last_loss:.4f}{cgdr}")
    print(describe(concept))
    print(f"saved {args.out} ({size_kb:.0f} KB)")
    if checkpoint_path is not None:
        print(f"saved the training state to {checkpoint_path}")
    if stopped:
        how = f"--resume {checkpoint_path or args.out}"
        print(f"to go on: the same command with {how}")
        return EXIT_INTERRUPTED
    return EXIT_OK


# --------------------------------------------------------------------------- generate
def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate images of a concept",
        description="Generate images with a saved concept ({} in the prompt stands for the person). "
                    "Without --concept: plain Stable Diffusion with the super-category word, as a baseline.",
    )
    add_model_arguments(parser, "preset name or YAML path (the model the concept was trained on)")
    parser.add_argument("--concept", type=Path, metavar="C.safetensors", help="the concept file (omit for plain SD)")
    parser.add_argument("--prompt", action="append", required=True, help="e.g. 'a photo of {} as a chef' (repeatable)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.png",
                        help="output image; several images are written as OUT_0.png, OUT_1.png, ...")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds seed, seed+1, ... (default 1)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's sample.steps)")
    parser.add_argument("--band", type=int, nargs=2, metavar=("LO", "HI"), help="timestep interval that gets the identity")
    parser.add_argument("--balance", type=float, help="tandem balance gamma (<1 favours the prompt, >1 the identity)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--scheduler", help="dpmsolver++, 'dpmsolver++ karras', ddim, euler, 'euler ancestral', unipc, pndm, ddpm")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the preset's sample.resolution, else its train.resolution)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset setting, e.g. sample.balance_layers=2")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a style LoRA (.safetensors) and its strength, e.g. ink.safetensors:0.7 (repeatable)")
    parser.set_defaults(func=run_generate)
    return parser


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{index}{out.suffix}") for index in range(count)]


def _save_image(image: Image, path: Path, settings: dict[str, Any]) -> None:
    if path.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("personamagic", json.dumps(settings))  # enough to reproduce the image
        image.save(path, pnginfo=info)
    else:
        image.save(path)


def run_generate(args: argparse.Namespace) -> int:
    from studio.config import check_band

    # Cheap checks first: a typo should not wait for a model to load.
    _check_output(args.out, IMAGE_SUFFIXES, "the output image")
    if args.num_images < 1:
        raise CliError(f"--num-images must be >= 1, got {args.num_images}")
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    cfg = _load_config(args)
    band = check_band(args.band, "--band") if args.band else None  # None: the preset's
    check_model(cfg)  # before torch is imported

    from studio.concept_file import compatibility_warning, load_concept, read_concept_info
    from studio.conditioning import check_prompt
    from studio.sampler import GenerationSettings, Sampler

    for prompt in args.prompt:
        check_prompt(prompt, require_identity=args.concept is not None)
    if args.concept is not None:
        # refuses foreign / damaged files, and concepts of another model's width, before any weight loads
        check_model(cfg, read_concept_info(args.concept).get("backbone"))
    backbone = _backbone(cfg)
    concept = None
    if args.concept is not None:
        concept = load_concept(args.concept, backbone)
        warning = compatibility_warning(concept, backbone)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    settings = GenerationSettings.from_config(
        cfg, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance, band=band,
        balance=args.balance, seeds=list(range(args.seed, args.seed + args.num_images)), height=args.size,
        width=args.size, scheduler=args.scheduler or None,
    ).kwargs()
    sampler = Sampler(backbone)
    sampler.check_inputs(concept, args.prompt, **settings)
    from studio.lora import applied, uses_from_arguments

    loras = uses_from_arguments(args.lora, backbone)
    with _progress(None, "generating") as bar, applied(backbone, loras):
        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = sampler(concept, args.prompt, callback_on_step_end=on_step, **settings)
    paths = _output_paths(args.out, len(result.images))
    for image, path, settings in zip(result.images, paths, result.settings):
        _save_image(image, path, settings)
    for path, caption in zip(paths, result.captions):
        print(f"{path}: {caption}")
    return EXIT_OK


# --------------------------------------------------------------------------- delegated commands
def _add_delegated(subparsers: Any, name: str, module: str, adder: str, help_text: str) -> None:
    """Register a sub-command that lives in its own module (``studio.cli_prepare``, ``studio.cli_eval``).

    The import happens here, not at the top, so the rest of the CLI works while such a module is
    missing or broken; the sub-command then explains that instead of crashing.
    """
    try:
        getattr(importlib.import_module(module), adder)(subparsers)
    except (ImportError, AttributeError) as exc:
        parser = subparsers.add_parser(name, help=f"{help_text} (unavailable)", add_help=False)
        parser.set_defaults(ignores_arguments=True)  # whatever follows, the answer is the same
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            raise CliError(f"the '{name}' command is not available in this installation ({module}: {reason})")

        parser.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio",
        description="PersonaMagic Studio: stage-regulated face customisation of Stable Diffusion 1.x.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(subparsers)
    add_generate_parser(subparsers)
    # prepare: face detection / crops / masks (owned by the face stack).
    _add_delegated(subparsers, "prepare", "studio.cli_prepare", "add_prepare_parser", "detect, align and mask faces")
    # eval: identity / prompt similarity over prompts x seeds x settings (owned by the metrics).
    _add_delegated(subparsers, "eval", "studio.cli_eval", "add_eval_parser", "score a concept")
    _add_delegated(subparsers, "score", "studio.cli_score", "add_score_parser", "score images made anywhere")
    _add_delegated(subparsers, "toy", "studio.cli_toy", "add_toy_parser", "the toy world")
    _add_delegated(subparsers, "compose", "studio.cli_compose", "add_compose_parser", "several people in one picture")
    _add_delegated(subparsers, "export", "studio.cli_export", "add_export_parser", "export a concept for A1111, ComfyUI, diffusers")
    return parser


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The one error policy of every sub-command: a StudioError prints as one ``error:`` line
    with exit status 2; anything else is logged with its traceback and exits with 1."""
    try:
        return int(func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StudioError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        _LOG.exception("unexpected error in %s", getattr(args, "command", None) or func.__name__)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command through :func:`run_command`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "ignores_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run_command(args.func, args)
