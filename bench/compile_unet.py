"""Does ``torch.compile`` of the UNet pay for the studio's training step? Eager steps, then the
first compiled step (compilation included), then compiled steps; prints the ratio.

    .venv/bin/python bench/compile_unet.py                       # CPU, 256 px, 1 thread
    python bench/compile_unet.py --device cuda --resolution 512  # on a lent GPU
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from sd15 import build_sd15_backbone

    with quiet_loading():
        backbone, _ = build_sd15_backbone(args.device, args.dtype)
    image, mask = training_photo(DEFAULT_PHOTO, args.resolution)
    step = checked_step(ours_trainer(backbone, image, mask, args.resolution).train_step)

    def timed() -> float:
        synchronize(backbone.device)
        started = time.perf_counter()
        step()
        synchronize(backbone.device)
        return time.perf_counter() - started

    print(f"{backbone.describe()}, {args.resolution} px, training step, batch 1")
    timed()  # warm-up
    eager = [timed() for _ in range(args.repeats)]
    backbone.unet.forward = torch.compile(backbone.unet.forward)
    first = timed()
    compiled = [timed() for _ in range(args.repeats)]
    ratio = statistics.median(compiled) / statistics.median(eager)
    print(f"| eager median s | first compiled step s (compiling) | compiled median s | compiled / eager |")
    print(f"|---|---|---|---|")
    print(f"| {statistics.median(eager):.3f} | {first:.1f} | {statistics.median(compiled):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
