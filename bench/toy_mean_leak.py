"""Does a toy backbone's sampling drift off its latent space's channel means? (bench/RESULTS-toy.md, 1f)

SD's schedule leaves sqrt(alpha_bar) = 0.068 of the latent in x_T at the first sampling step,
so a latent space whose channel means are far from zero leaks them into every noisy input the
UNet was trained on, while sampling starts from noise without them. This prints the channel
means of real latents and of sampled ones, the same DDIM loop (50 steps) started from plain
noise and from noise carrying the leak (sqrt(alpha_bar_T) * mu), and writes both rows of images.

    python bench/toy_mean_leak.py --out leak.png                      # the shipped assets/toy
    python bench/toy_mean_leak.py --run /work/toyrun --out leak.png   # a pretraining run's last checkpoint
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from toy_look import PROMPTS  # noqa: E402
from toy_world import model_source  # noqa: E402


def _means(values) -> str:
    return " ".join(f"{float(v):+.2f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a `python -m studio toy pretrain --out` folder (default: assets/toy)")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    from studio.backbone import SD15_SCHEDULER_CONFIG, get_backbone
    from studio.config import load_preset
    from studio.toy import models as toy_models
    from studio.toy.world import render_prompt

    prompts = [p.replace("{}", "a person") for p in PROMPTS]
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        backbone = get_backbone(load_preset("toy", **{"model.source": model_source(args.run, Path(scratch))}).model)
        vae, unet, scale = backbone.vae, backbone.unet, backbone.vae.config.scaling_factor
        renders = np.stack([np.asarray(render_prompt(200_000 + i, PROMPTS[i % 4], seed=i).convert("RGB")) for i in range(256)])
        real = vae.encode(toy_models.to_input(renders)).latent_dist.mean * scale  # (256, 4, 16, 16)
        mu = real.mean(dim=(0, 2, 3))
        print(f"{'real latents':>16}: channel means {_means(mu)}, std {real.std():.2f}")
        ids = backbone.tokenizer(prompts + [""] * len(prompts), padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids
        hidden = backbone.text_encoder(ids)[0].to(unet.dtype)
        scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
        rows = []
        for start in ("plain noise", "noise + leak"):
            scheduler.set_timesteps(50)
            z = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(args.seed))
            if start == "noise + leak":
                z = z + scheduler.alphas_cumprod[scheduler.timesteps[0]].sqrt() * mu.view(1, 4, 1, 1)
            for t in scheduler.timesteps:
                eps = unet(torch.cat([z, z]).to(unet.dtype), t, hidden).sample.float()
                cond, uncond = eps.chunk(2)
                z = scheduler.step(uncond + args.guidance * (cond - uncond), t, z).prev_sample
            print(f"{start:>16}: channel means {_means(z.mean(dim=(0, 2, 3)))}, std {z.std():.2f}")
            images = vae.decode(z / scale).sample.clamp(-1, 1)
            rows.append([Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)) for x in images])
    sheet = Image.new("RGB", (64 * len(prompts), 64 * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image, (64 * c, 64 * r))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: DDIM 50 steps / guidance {args.guidance:g} from plain noise (top) and noise + leak (bottom)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
