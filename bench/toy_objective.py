"""Toy world: does the training objective prefer the token that draws the person?

    python bench/toy_objective.py --run DIR [--identities 6]

A run pretrained with identity tokens (``--identity-tokens``) has a token that draws toward a
person it never saw: the class word's embedding + W e, e the image encoder's embedding of the
selfie (``bench/toy_reach.py`` measures how far). For each of N unseen identities this bench
asks whether the studio's training objective would choose that token: the masked reconstruction
loss of the one selfie (the trainer's own latents, face mask and band; fixed draws of t and
noise, prompt "a photo of {}") for the class word, for W e of the person, for W e of *another*
person, and for the one token the toy preset's training (one token, no bypass) ends with. Also
where that token points: its norm and its cosine to the class word and to the W e direction.
Prints a markdown table; nothing is copied in.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toy_reach import PretrainingToken  # noqa: E402
from toy_world import FIRST, World, cpu_name, model_source  # noqa: E402

DRAWS = 96  # fixed (t, noise) draws per loss


def reconstruction_loss(world: World, trainer, tokens, seed: int = 123) -> float:
    """The trainer's masked ε loss on its first photo, ``tokens(t)`` (B,) -> (B, K, D) in the
    prompt's slots, over DRAWS fixed draws of t in the trainer's band and noise."""
    from studio.conditioning import encode_text, tokenize
    from studio.losses import masked_mse

    bb = world.backbone
    generator = torch.Generator().manual_seed(seed)
    lo, hi = trainer.band
    num_slots = tokens(torch.tensor([lo])).shape[1]
    ids, mask = tokenize(bb.tokenizer, ["a photo of {}"], num_slots, trainer.slot_id)
    first = torch.zeros(16, dtype=torch.long)
    losses = []
    with torch.no_grad():
        for _ in range(DRAWS // 16):
            t = torch.randint(lo, hi, (16,), generator=generator)
            latents = trainer.latents[first]
            noise = torch.randn(latents.shape, generator=generator)
            noisy = bb.noise_scheduler.add_noise(latents, noise, t)
            states = encode_text(bb, ids.expand(16, -1), mask.expand(16, -1), identity=tokens(t))
            pred = bb.unet(noisy, t, encoder_hidden_states=states.hidden).sample
            losses.append(masked_mse(pred, noise, trainer.rec_weights[first]).item())
    return float(np.mean(losses))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a pretraining run folder trained with --identity-tokens")
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy-objective"))
    args = parser.parse_args()
    from studio.faces import prepare
    from studio.trainer import Trainer, TrainingPhoto

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    world = World({"model.source": model_source(args.run, args.out)})
    token = PretrainingToken.of_run(args.run, world)
    if token is None:
        raise SystemExit(f"{args.run} has no identity-token map: pretrain with --identity-tokens")
    rows: dict[str, list[float]] = {}
    for k in range(args.identities):
        identity = FIRST + 600 + k  # the identities of bench/toy_reach.py
        selfie, stranger = world.selfie(identity, args.out), world.selfie(identity + 50, args.out)
        cfg = world.cfg.replace(**{"train.preview_every": 0, "concept.num_tokens": 1, "concept.use_bypass": False})
        trainer = Trainer(world.backbone, cfg, [TrainingPhoto.from_prepared(p) for p in prepare([str(selfie)], cfg.face).photos])
        word, own, other = trainer.class_embedding, token.of(selfie), token.of(stranger)
        fixed = lambda vector: (lambda t: vector.expand(len(t), 1, -1))  # noqa: E731
        found = {"class word": reconstruction_loss(world, trainer, fixed(word)),
                 "class word + W e of the person": reconstruction_loss(world, trainer, fixed(own)),
                 "class word + W e of another person": reconstruction_loss(world, trainer, fixed(other))}
        for _ in trainer.run():
            pass
        mapper = trainer.mapper.eval()
        with torch.no_grad():
            found["the token training ends with"] = reconstruction_loss(world, trainer, mapper)
            trained = mapper(torch.tensor([500]))[0, 0]
        for label, value in found.items():
            rows.setdefault(f"loss: {label}", []).append(value)
        rows.setdefault("loss: W e of the person minus W e of another person, paired", []).append(
            found["class word + W e of the person"] - found["class word + W e of another person"])
        rows.setdefault("norm: class word / W e token / trained token (t = 500)", []).append(
            (word.norm().item(), own.norm().item(), trained.norm().item()))
        rows.setdefault("cosine of the trained token to the class word", []).append(
            torch.cosine_similarity(trained, word, 0).item())
        rows.setdefault("cosine of (trained − class word) to W e", []).append(
            torch.cosine_similarity(trained - word, own - word, 0).item())
        print(f"identity {identity}: " + ", ".join(f"{label} {value:.4f}" for label, value in found.items())
              + f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print(f"Command: `python bench/toy_objective.py --run {args.run} --identities {args.identities}` ({cpu_name()}; "
          f"{time.perf_counter() - started:.0f} s). Unseen identities from 100 601; the toy preset's training with one "
          f"token and no bypass; losses over {DRAWS} fixed draws of t and noise; mean ± std over identities.\n")
    print("| measure | mean ± std |\n|---|---|")
    for label, values in rows.items():
        if isinstance(values[0], tuple):
            print(f"| {label} | " + " / ".join(f"{v:.3f}" for v in np.mean(values, axis=0)) + " |")
        else:
            print(f"| {label} | {np.mean(values):.4f} ± {np.std(values):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
