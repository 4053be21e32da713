"""``python -m studio toy {render,pretrain}``: the toy world's ground truth and its model (docs/TOY.md)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MAX_RENDER_SIZE = 1024


def add_toy_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("toy", help="the toy world: render ground truth, pretrain the toy model",
                                   description="The procedural world of portraits the toy backbone was trained on.")
    toy = parser.add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")

    render = toy.add_parser("render", help="draw an identity as a prompt asks",
                            description="Ground truth: identity N in the scene a prompt describes ({} = the identity).")
    render.add_argument("--identity", type=int, required=True, help="identity number (>= 100000: never seen in pretraining)")
    render.add_argument("--prompt", default="a photo of {}", help="scene words the toy world knows, with {} for the person")
    render.add_argument("--seed", type=int, default=0, help="framing jitter and texture noise")
    render.add_argument("--size", type=int, default=64, help=f"side in pixels (64 = the model's size; at most {MAX_RENDER_SIZE})")
    render.add_argument("--out", type=Path, required=True, help="PNG file to write")
    render.set_defaults(func=run_render)

    pretrain = toy.add_parser("pretrain", help="train the toy backbone and its instruments (about an hour on 2 CPU cores)",
                              description="Seeded and resumable: run it again with the same --out to continue.")
    pretrain.add_argument("--out", type=Path, required=True, help="folder for data, checkpoints and the diffusers model")
    pretrain.add_argument("--stage", action="append", choices=("data", "instruments", "backbone", "decoder"),
                          help="run only these stages (default: all, in order)")
    pretrain.add_argument("--minutes", type=float, help="time budget of the UNet + text encoder stage")
    pretrain.add_argument("--decoder-minutes", type=float, help="time budget of the decoder fine-tuning stage")
    pretrain.add_argument("--decoder-rounds", type=int, metavar="N",
                          help="fine-tune the decoder again until it has had N rounds (default 1; a --continue-from folder brings its own)")
    pretrain.add_argument("--decoder-feature-weight", type=float, metavar="W",
                          help="extra loss weight of the pixels at the eyes and mouth in the decoder stage (default 0: every pixel alike)")
    pretrain.add_argument("--decoder-latent-noise", type=float, metavar="F",
                          help="in the decoder stage, add Gaussian noise up to F times the latents' std to what it decodes (default 0)")
    pretrain.add_argument("--threads", type=int, default=2, help="torch threads (and render workers)")
    pretrain.add_argument("--device", default="cpu", help="where the UNet + text encoder stage runs, e.g. cuda (default cpu)")
    pretrain.add_argument("--instrument-steps", type=int, metavar="N",
                          help="training steps of each instrument the instruments stage trains: face locator, identity "
                               "encoder, attribute classifiers (default 4000; an instrument already in the folder is kept)")
    pretrain.add_argument("--batch", type=int, help="UNet batch size (default 64)")
    pretrain.add_argument("--steps", type=int, help="also stop the UNet stage at this step (unlike --minutes, the same on any machine)")
    pretrain.add_argument("--identity-tokens", type=float, metavar="SHARE",
                          help="share of the captions whose class word carries the identity (0-1; default 0, docs/TOY.md)")
    pretrain.add_argument("--min-snr", type=float, metavar="GAMMA",
                          help="weight each sample's loss by min(SNR, GAMMA) / SNR (Min-SNR; e.g. 5; default off)")
    pretrain.add_argument("--feature-weight", type=float, metavar="W",
                          help="extra weight of the latent pixels at the eyes and mouth in the UNet's loss (default 0: every pixel alike)")
    pretrain.add_argument("--head-width", type=int, metavar="W",
                          help="width of the UNet's attention heads, e.g. 32 (1, 2, 4 heads at 32, 64, 128 channels); default: "
                               "the first runs' 32 heads of width 2-4 (docs/TOY.md); a resumed run keeps what it was built with")
    pretrain.add_argument("--fine-attention", action="store_true",
                          help="cross-attention at the 16 x 16 latent level too, as SD 1.x has at its finest (docs/TOY.md); "
                               "continued from a folder without it, the new layers start as exact no-ops")
    pretrain.add_argument("--anneal", action="store_true",
                          help="decay the learning rate along a cosine to a tenth by --steps (which it needs), from the step it is first given")
    pretrain.add_argument("--continue-from", type=Path, metavar="FOLDER",
                          help="start the UNet and decoder stages from a trained toy folder, e.g. assets/toy (it goes on from its step; --minutes is the new run's own time)")
    pretrain.set_defaults(func=run_pretrain)


def run_render(args: argparse.Namespace) -> int:
    from studio.cli import CliError
    from studio.toy.world import PLACEHOLDER_HINT, render_prompt

    if args.identity < 0:
        raise CliError(f"--identity must be >= 0, got {args.identity}")
    if not 16 <= args.size <= MAX_RENDER_SIZE:
        raise CliError(f"--size must be between 16 and {MAX_RENDER_SIZE} pixels, got {args.size}")
    if "{}" not in args.prompt:
        raise CliError(PLACEHOLDER_HINT)
    if args.out.suffix.lower() != ".png" or not args.out.parent.is_dir():
        raise CliError(f"--out must be a .png file in an existing folder, got {args.out}")
    image = render_prompt(args.identity, args.prompt, seed=args.seed, size=args.size)  # ToyPromptError: a StudioError
    image.save(args.out)
    print(args.out)
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from studio.cli import CliError
    from studio.toy.pretrain import STAGES, UNET_CHANNELS, PretrainPlan, check_continue_folder, pretrain

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device must be a torch device such as cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for, but torch sees no CUDA GPU here")
    if args.batch is not None and not 1 <= args.batch <= 4096:
        raise CliError(f"--batch must be between 1 and 4096, got {args.batch}")
    if args.instrument_steps is not None and not 1 <= args.instrument_steps <= 1_000_000:
        raise CliError(f"--instrument-steps must be between 1 and 1000000, got {args.instrument_steps}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.identity_tokens is not None and not 0 <= args.identity_tokens <= 1:
        raise CliError(f"--identity-tokens is a share from 0 to 1, got {args.identity_tokens}")
    if args.min_snr is not None and not args.min_snr > 0:
        raise CliError(f"--min-snr is a positive signal-to-noise cap such as 5, got {args.min_snr}")
    if args.decoder_rounds is not None and not 1 <= args.decoder_rounds <= 100:
        raise CliError(f"--decoder-rounds must be between 1 and 100, got {args.decoder_rounds}")
    for flag, value in (("--feature-weight", args.feature_weight), ("--decoder-feature-weight", args.decoder_feature_weight)):
        if value is not None and not 0 <= value <= 100:
            raise CliError(f"{flag} must be between 0 and 100, got {value}")
    if args.decoder_latent_noise is not None and not 0 <= args.decoder_latent_noise <= 1:
        raise CliError(f"--decoder-latent-noise must be between 0 and 1, got {args.decoder_latent_noise}")
    attended = UNET_CHANNELS if args.fine_attention else UNET_CHANNELS[1:]
    if args.head_width is not None and not (args.head_width > 0 and all(c % args.head_width == 0 for c in attended)):
        raise CliError(f"--head-width must divide the UNet's attention channels {', '.join(map(str, attended))}, got {args.head_width}")
    if args.anneal and args.steps is None:
        raise CliError("--anneal decays the learning rate towards --steps: give --steps too")
    if args.continue_from is not None:
        if not args.continue_from.is_dir():
            raise CliError(f"--continue-from must be a toy model folder, got {args.continue_from}")
        check_continue_folder(args.continue_from)  # before any stage runs
    flags = {"continue_from": str(args.continue_from) if args.continue_from else None, "unet_batch": args.batch, "unet_minutes": args.minutes, "decoder_minutes": args.decoder_minutes,
             "unet_steps": args.steps, "instrument_steps": args.instrument_steps, "identity_token_share": args.identity_tokens,
             "min_snr_gamma": args.min_snr, "anneal": args.anneal or None, "unet_feature_weight": args.feature_weight, "decoder_rounds": args.decoder_rounds,
             "decoder_feature_weight": args.decoder_feature_weight, "decoder_latent_noise": args.decoder_latent_noise,
             "unet_head_width": args.head_width, "unet_fine_attention": args.fine_attention or None}
    plan = PretrainPlan(device=str(device), **{key: value for key, value in flags.items() if value is not None})
    pretrain(args.out, tuple(args.stage or STAGES), plan, threads=args.threads)
    return 0
