"""A/B of the UNet's and VAE's memory format (NCHW vs channels_last) on the full-size SD 1.5
architecture: the studio's training step and a plain preview, alternating A, B, A, B, ...

    .venv/bin/python bench/memory_format.py --dtype bfloat16 --resolution 512 --skip-train
    python bench/memory_format.py --device cuda --dtype bfloat16 --resolution 512

studio.backbone.assemble_backbone picks channels_last for half-precision weights; this script
is how that choice was measured (bench/RESULTS.md, finding 5).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from run import DEFAULT_PHOTO, checked_step, ours_trainer, synchronize, training_photo  # noqa: E402

from studio.backbone import quiet_loading  # noqa: E402

FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--resolution", type=int, default=256, help="training and preview side in pixels")
    parser.add_argument("--preview-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--skip-train", action="store_true", help="time only the preview")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from sd15 import build_sd15_backbone

    from studio.sampler import Sampler

    with quiet_loading():
        backbone, _ = build_sd15_backbone(args.device, args.dtype)
    device = backbone.device
    print(f"{backbone.describe()}, {args.resolution} px, {torch.get_num_threads()} thread(s)")
    workloads = {}
    if not args.skip_train:
        image, mask = training_photo(DEFAULT_PHOTO, args.resolution)
        workloads["training step"] = checked_step(ours_trainer(backbone, image, mask, args.resolution).train_step)
    sampler = Sampler(backbone)
    workloads[f"preview (2 images, {args.preview_steps} steps)"] = lambda: sampler(
        None, ["a photo of {} at sea"], seeds=[0, 1], num_inference_steps=args.preview_steps,
        height=args.resolution, width=args.resolution, guidance_scale=7.5,
    )

    times: dict[tuple[str, str], list[float]] = {(w, f): [] for w in workloads for f in FORMATS}
    for round_ in range(args.repeats + 1):
        for name, memory_format in FORMATS.items():
            backbone.unet.to(memory_format=memory_format)
            backbone.vae.to(memory_format=memory_format)
            for workload, run in workloads.items():
                synchronize(device)
                started = time.perf_counter()
                run()
                synchronize(device)
                seconds = time.perf_counter() - started
                print(f"  {'warm-up' if round_ == 0 else f'round {round_}'}: {workload}, {name}: {seconds:.2f} s", flush=True)
                if round_:
                    times[(workload, name)].append(seconds)

    print(f"\n| workload | NCHW median s | channels_last median s | channels_last / NCHW |\n|---|---|---|---|")
    for workload in workloads:
        nchw, nhwc = (statistics.median(times[(workload, f)]) for f in FORMATS)
        print(f"| {workload} | {nchw:.3f} | {nhwc:.3f} | {nhwc / nchw:.3f} |")


if __name__ == "__main__":
    main()
