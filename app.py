"""PersonaMagic Studio: `python app.py [--preset NAME] [--server-port PORT]`.

Also the Hugging Face Space entry point (README front matter: app_file: app.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

# Before torch loads: idle OpenMP threads sleep instead of spinning, so a CPU shared by the
# training thread, the web server and other sessions is not burnt on busy-waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

warnings.filterwarnings("ignore", message=".*Pandas4Warning.*")

from studio.config import available_presets, load_preset  # noqa: E402
from studio.errors import StudioError, one_line  # noqa: E402

REAL_PRESET = "sd15"
ZERO_GPU_PRESET = "sd15-fast"  # a few hundred steps: fits ZeroGPU's daily quota


def default_preset() -> str:
    """$STUDIO_PRESET, else real SD 1.5 weights when they load without a download, else the toy
    world shipped in assets/toy (tiny if its files are missing)."""
    if os.environ.get("STUDIO_PRESET"):
        return os.environ["STUDIO_PRESET"]
    from studio.backbone import weights_available
    from studio.runner import zero_gpu

    real = ZERO_GPU_PRESET if zero_gpu() else REAL_PRESET
    if weights_available(load_preset(real).model):
        return real
    return "toy" if weights_available(load_preset("toy").model) else "tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PersonaMagic Studio: one-shot face customisation of SD 1.x")
    parser.add_argument("--preset", help=f"one of {', '.join(available_presets())} or a YAML path (default: sd15 if its weights are here, else toy)")
    parser.add_argument("--model", help="the base model: hub id, local diffusers folder or .safetensors file "
                        f"(without --preset the {REAL_PRESET} preset's settings apply)")
    parser.add_argument("--image-encoder", help="CLIP image encoder of the image bypass: hub id or folder, or 'none'")
    parser.add_argument("--server-name", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--server-port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    return parser.parse_args(argv)


def create_demo(preset: str | None = None, model: str | None = None, image_encoder: str | None = None):
    """The Blocks app for a preset (used by launch, tests and Spaces). A model given without a
    preset runs with the real-model preset's settings; it is checked here, before the UI builds."""
    from studio.cli import model_overrides
    from studio.ui import build_demo
    from studio.weights import check

    cfg = load_preset(preset or (REAL_PRESET if model else default_preset()))
    cfg = cfg.replace(**model_overrides(argparse.Namespace(model=model, image_encoder=image_encoder)))
    if model or image_encoder:
        check(cfg.model)  # a wrong path, an SDXL folder, a missing image encoder: said at start
    from studio.runner import zero_gpu

    if zero_gpu():  # ZeroGPU wants the weights placed on cuda at import, before any GPU call
        from studio.backbone import get_backbone

        get_backbone(cfg.model)
    demo = build_demo(cfg)
    demo.queue(default_concurrency_limit=None)
    return demo


def launch_kwargs() -> dict:
    from studio.ui.app import ACCESSIBLE_NAMES_JS, CSS, HEAD

    # Faces are personal data: keep no run history on the server. Uploads are photos and
    # concept files (a few MB): refuse anything huge before it reaches a handler.
    return dict(css=CSS, js=ACCESSIBLE_NAMES_JS, head=HEAD, run_history=False, footer_links=["api", "settings"], max_file_size="100mb")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        demo = create_demo(args.preset, args.model, args.image_encoder)
    except StudioError as exc:  # a bad preset, missing weights: one line, as the CLI says it
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    # SIGTERM (a container or Space stopping) cleans up like Ctrl-C: Gradio's own shutdown,
    # then every session's training stops and its folders and uploads are deleted.
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share, **launch_kwargs())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.sessions.close_all()
    return 0


def _sigterm_as_ctrl_c(signum: int, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
