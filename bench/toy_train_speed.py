"""Seconds per training step of the toy UNet + text encoder (batch B, 16×16×4 latents, random
data) in fp32 and under bf16 autocast, in the same run: whether bf16 pays on this CPU.

    python bench/toy_train_speed.py [--batch 64] [--steps 6]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toy_world import cpu_name  # noqa: E402


def seconds_per_step(bf16: bool, batch: int, steps: int) -> float:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.backbone import load_tokenizer
    from studio.toy.pretrain import text_config, unet_config

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(load_tokenizer())))
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size))
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), 3e-4)
    ids = torch.randint(0, 49407, (batch, 77))
    z, t = torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(z, t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred.float(), z)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    fp32 = seconds_per_step(False, args.batch, args.steps)
    bf16 = seconds_per_step(True, args.batch, args.steps)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} timed steps each")
    print("| precision | s / step | × fp32 |\n|---|---|---|")
    print(f"| fp32 (baseline) | {fp32:.3f} | 1.00 |\n| bf16 autocast | {bf16:.3f} | {bf16 / fp32:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
