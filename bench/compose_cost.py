"""What composition costs: composed vs plain generation time, measured in the same run (docs/COMPOSE.md, "Cost").

    python bench/compose_cost.py --preset toy --steps 20 --repeats 3

Rows: plain generation with one concept (the baseline), composition of one concept without a
photo (should be ~1x), one concept + its photo (RSA: one more UNet pass per step), two concepts
with regions, two concepts + two photos (all on the model's square), and two concepts on the
wide picture two people get (compose.aspect). Median wall time of ``--repeats`` runs after one
warm-up; ratios against the baseline. Prints a markdown section.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from studio.compose import Composer, Person, Reference  # noqa: E402
from studio.config import load_preset  # noqa: E402
from toy_world import cpu_name  # noqa: E402


def synthetic_concept(backbone, word: str, seed: int):
    """A concept with random mapper heads (cost does not depend on what was learned)."""
    from studio.concept import Concept
    from studio.conditioning import super_category_id
    from studio.mapper import IdentityMapper

    embedding = backbone.text_encoder.get_input_embeddings().weight[super_category_id(backbone.tokenizer, word)]
    mapper = IdentityMapper(embedding, num_tokens=2, band=(200, 900), num_anchors=8, hidden_dim=16, time_encoding_dim=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mapper.head.weight.copy_(torch.randn(mapper.head.weight.shape, generator=generator) * 0.1)
    return Concept(mapper=mapper.eval().requires_grad_(False), super_category=word, train_band=(200, 900),
                   late_stage="band_edge", backbone=backbone.fingerprint())


def reference(side: int, colour) -> Reference:
    mask = np.zeros((side, side), np.float32)
    mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1.0
    return Reference(Image.new("RGB", (side, side), colour), mask)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    """The CPU model and its core count (nproc would count OMP_NUM_THREADS instead)."""
    name = cpu_name()
    return f"{name.rsplit(',', 1)[0]}, {os.cpu_count()} vCPUs)" if "(" in name else f"{name} ({os.cpu_count()} vCPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from studio.backbone import get_backbone
    from studio.sampler import Sampler

    cfg = load_preset(args.preset)
    backbone = get_backbone(cfg.model)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sampler = Sampler(backbone)
    composer = Composer(sampler, cfg.compose)
    word = cfg.concept.super_category
    a, b = synthetic_concept(backbone, word, 1), synthetic_concept(backbone, word, 2)
    side = backbone.native_resolution
    ref_a, ref_b = reference(side, (200, 120, 90)), reference(side, (90, 120, 200))
    height, width = composer.canvas(side, 2)  # two people's picture (compose.aspect); the rows above: squares
    settings = dict(num_inference_steps=args.steps, guidance_scale=cfg.sample.guidance_scale, seeds=[0],
                    scheduler=cfg.sample.scheduler, negative_prompt=cfg.sample.negative_prompt, band=tuple(cfg.sample.band))
    rows = [
        ("plain generation, one concept (baseline)", lambda: sampler(a, "a photo of {}", **settings)),
        ("compose: one concept, no photo", lambda: composer([Person(concept=a)], "a photo of {0}", **settings)),
        ("compose: one concept + its photo (RSA)", lambda: composer([Person(concept=a, reference=ref_a)], "a photo of {0}", **settings)),
        ("compose: two concepts, located regions", lambda: composer([Person(concept=a), Person(concept=b)], "a photo of {0} and {1}", **settings)),
        ("compose: two concepts + two photos", lambda: composer(
            [Person(concept=a, reference=ref_a), Person(concept=b, reference=ref_b)], "a photo of {0} and {1}", **settings)),
        (f"compose: two concepts, located regions, on their wide picture ({width} × {height}, the Compose tab's)",
         lambda: composer([Person(concept=a), Person(concept=b)], "a photo of {0} and {1}", height=height, width=width, **settings)),
    ]
    results = [(name, timed(fn, args.repeats)) for name, fn in rows]
    base = results[0][1]
    print(f"### Cost of composition ({args.preset}, {args.steps} steps, 1 image, median of {args.repeats})\n")
    print(f"Machine: {machine()}, shared; `python bench/compose_cost.py --preset {args.preset} --steps {args.steps} "
          f"--repeats {args.repeats}`.\n")
    print("| run | seconds | × plain |")
    print("|---|---|---|")
    for name, seconds in results:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
