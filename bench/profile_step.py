"""Where the time of one training step goes: torch.profiler top ops, and forward seconds per
top-level module (text encoder, UNet, VAE, image encoder, mapper) with backward as the rest.

    .venv/bin/python bench/profile_step.py --variant ours --resolution 256 --threads 1
    python bench/profile_step.py --device cuda --variant ours --resolution 512 --batch 1
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from run import DEFAULT_PHOTO, checked_step, ours_trainer, synchronize, training_photo  # noqa: E402

from studio.backbone import quiet_loading  # noqa: E402


def build_variant(name: str, backbone, resolution: int, batch: int):
    from reference import RecipeSettings, ReferenceRecipe, TextualInversionStep

    image, mask = training_photo(DEFAULT_PHOTO, resolution)
    if name == "ours":
        return checked_step(ours_trainer(backbone, image, mask, resolution, batch).train_step)
    if name == "reference":
        recipe = ReferenceRecipe(backbone, image, mask, RecipeSettings(batch_size=batch, grad_accum=1, resolution=resolution))
        return checked_step(recipe.step), recipe
    return checked_step(TextualInversionStep(backbone, image, resolution, batch_size=batch).step)


def forward_seconds(modules: dict[str, torch.nn.Module], device: torch.device) -> tuple[dict[str, float], list]:
    """Hooks that add up each module's forward wall time (synchronised on CUDA)."""
    totals: dict[str, float] = defaultdict(float)
    handles = []
    for name, module in modules.items():
        if module is None:
            continue
        starts: list[float] = []

        def pre(_m, _i, starts=starts):
            synchronize(device)
            starts.append(time.perf_counter())

        def post(_m, _i, _o, name=name, starts=starts):
            synchronize(device)
            totals[name] += time.perf_counter() - starts.pop()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return totals, handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("ours", "reference", "ti"), default="ours")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sd15 import build_sd15_backbone

    with quiet_loading():
        backbone, _ = build_sd15_backbone(args.device, args.dtype)
    built = build_variant("ti" if args.variant == "ti" else args.variant, backbone, args.resolution, args.batch)
    step, recipe = built if isinstance(built, tuple) else (built, None)
    modules = {
        "text encoder": recipe.text_encoder if recipe else backbone.text_encoder,
        "unet": recipe.unet if recipe else backbone.unet,
        "vae encoder": (recipe.vae if recipe else backbone.vae).encoder,
        "image encoder": recipe.image_encoder if recipe else backbone.image_encoder,
    }
    step()  # warm-up
    synchronize(backbone.device)
    totals, handles = forward_seconds(modules, backbone.device)
    started = time.perf_counter()
    step()
    synchronize(backbone.device)
    wall = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    print(f"{args.variant}, {args.resolution} px, batch {args.batch}, {backbone.describe()}: step {wall:.3f} s")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  forward {name:14s} {seconds:8.3f} s  {100 * seconds / wall:5.1f} %")
    rest = wall - sum(totals.values())
    print(f"  backward + rest        {rest:8.3f} s  {100 * rest / wall:5.1f} %")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if backbone.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(backbone.device)
    key = "self_cuda_time_total" if backbone.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
