"""A look at a toy backbone: ground-truth renders of four prompts, their VAE round trip, and
samples from three samplers, one row each, in one PNG (bench/RESULTS-toy.md, section 1b).

    python bench/toy_look.py --out look.png                       # the shipped assets/toy
    python bench/toy_look.py --run /work/toyrun --out look.png    # a pretraining run in progress:
                                   # its last checkpoint's EMA weights and its (fine-tuned) VAE
    python bench/toy_look.py --out look.png --prompt "a photo of {} smiling" --prompt ...   # other columns
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from toy_world import model_source  # noqa: E402

PROMPTS = ["a photo of {} wearing a red hat on a beach", "an oil painting of {} in a forest",
           "a photo of {} wearing sunglasses in a city at night", "a pencil sketch of {} wearing a crown"]
SAMPLERS = [("ddim", 50, 3.0), ("euler", 30, 5.0), ("dpmsolver++", 20, 1.0)]  # (scheduler, steps, guidance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a `python -m studio toy pretrain --out` folder (default: assets/toy)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt with {} for the person, once per column (default: the four of section 1b)")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from studio.backbone import get_backbone
    from studio.config import load_preset
    from studio.sampler import Sampler
    from studio.toy.world import render_prompt

    columns = args.prompt or PROMPTS
    renders = [render_prompt(100001 + i, p, seed=0, size=64) for i, p in enumerate(columns)]
    with tempfile.TemporaryDirectory() as scratch:
        backbone = get_backbone(load_preset("toy", **{"model.source": model_source(args.run, Path(scratch))}).model)
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1) for im in renders])
        with torch.no_grad():
            decoded = backbone.vae.decode(backbone.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        rows = [renders, [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)) for t in decoded]]
        sampler = Sampler(backbone)
        prompts = [p.replace("{}", "a person") for p in columns]
        for scheduler, steps, guidance in SAMPLERS:
            result = sampler(None, prompts, seeds=[args.seed], num_inference_steps=steps, guidance_scale=guidance,
                             scheduler=scheduler, height=64, width=64)
            rows.append(list(result.images))
    sheet = Image.new("RGB", (64 * len(columns), 64 * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image.resize((64, 64)), (64 * c, 64 * r))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: renders, VAE round trip, then {', '.join(f'{s} {n} steps / {g}' for s, n, g in SAMPLERS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
