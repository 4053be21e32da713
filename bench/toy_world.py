"""Quality in the toy world: the measurements behind bench/RESULTS-toy.md.

    python bench/toy_world.py --sections base,oneshot,sliders,ablation --out bench/out/toy

- base: does the pretrained toy model follow prompts? Per scene-attribute value, N samples of
  "a photo of a person <phrase>" (class word, no concept); share in which the attribute
  classifier sees the asked value; beside it, the same share on ground-truth renders of the
  prompt (unseen identities) and on those renders through the VAE: what the instruments and the
  VAE allow at most.
- oneshot: one toy selfie of an unseen identity, the toy preset's default training; 8 prompts x
  2 seeds scored for identity (toy encoder) and prompt (attribute classifiers), against
  ground-truth renders of the same identity, renders of other identities, and the base model.
- sliders: interval width x tandem balance on that concept, mean and 95 % interval.
- ablation: variants x identities x prompts x seeds, mean +- std, and a scatter PNG.

Every figure comes from this run; nothing is copied in. Prints markdown tables to stdout and
writes them (plus JSON and PNGs) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.config import load_preset  # noqa: E402

PLAIN_PROMPTS = [
    "a photo of {}",
    "a photo of {} on a beach",
    "an oil painting of {}",
    "a pencil sketch of {} wearing glasses",
    "a photo of {} wearing a red hat in a forest",
    "pixel art of {} wearing a beanie",
    "a watercolor of {} in front of a red wall",
    "a photo of {} wearing a crown in a city at night",
]
# four scene attributes asked in every prompt: the base model meets about nine in ten of them
# where it meets 31 of 32 of the plain set's, so a variant or setting that costs the prompt shows
RICH_PROMPTS = [
    "an oil painting of {} wearing a red hat and sunglasses on a beach",
    "a pencil sketch of {} wearing a crown and glasses in a forest",
    "pixel art of {} wearing a beanie on a snowy mountain, smiling",
    "a watercolor of {} with sunglasses in a city at night, looking surprised",
    "a photo of {} wearing a crown and glasses in front of a red wall",
    "an oil painting of {} wearing a beanie in a city at night, smiling",
    "a pencil sketch of {} wearing a red hat on a snowy mountain, looking surprised",
    "pixel art of {} wearing sunglasses and a crown on a beach",
]
PROMPT_SETS = {"plain": PLAIN_PROMPTS, "rich": RICH_PROMPTS}
PROMPTS = PLAIN_PROMPTS  # the set this run measures (--prompts)
SEEDS = [0, 1]
FIRST = 100_001
SELFIE = dict(prompt="a photo of {} in a blue studio", seed=0, size=256)
# the few-shot measurement's further photos of a person (bench/toy_band.py --photos): "pose" is
# the selfie's scene again with other framing jitter; "scenes" varies setting and expression,
# with nothing the plain prompts ask for (the world's six settings leave only the snowy mountain)
MORE_SELFIE_PROMPTS = {
    "pose": [SELFIE["prompt"]] * 4,
    "scenes": ["a photo of {} on a snowy mountain", "a photo of {} in a blue studio, smiling",
               "a photo of {} on a snowy mountain, looking surprised", "a photo of {} smiling on a snowy mountain"],
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        extra = "AMX" if "amx" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
        return f"{name} ({extra}, {len(os.sched_getaffinity(0))} cores)"  # not nproc: it counts OMP_NUM_THREADS
    except Exception:
        return platform.processor() or "unknown CPU"


def ci95(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v)))


def model_source(run: Path | None, scratch: Path) -> str:
    """The toy preset's ``model.source`` for a bench: "toy" (the shipped assets/toy), or a copy of
    it in ``scratch`` carrying pretraining run ``run``'s VAE and its last checkpoint (EMA weights;
    the shipped UNet and text encoder where the run has none, e.g. a decoder-only run)."""
    import shutil

    if run is None:
        return "toy"
    from studio.toy.pretrain import export_checkpoint
    from studio.weights import TOY_DIR

    folder = scratch / "toy-model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TOY_DIR, folder)
    if (run / "checkpoint" / "ema.safetensors").exists():
        export_checkpoint(run, folder)
    shutil.rmtree(folder / "vae")
    shutil.copytree(run / "vae", folder / "vae")
    return str(folder)


def to_tensor(images: list[Image.Image]):
    """PIL images -> (N, 3, H, W) torch tensor in [-1, 1]."""
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def to_images(pixels) -> list[Image.Image]:
    """(N, 3, H, W) torch tensor in [-1, 1] -> PIL images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


class World:
    """The toy backbone, sampler and scorer, loaded once."""

    def __init__(self, overrides: dict | None = None) -> None:
        from studio.backbone import get_backbone
        from studio.metrics import Scorer
        from studio.sampler import Sampler

        self.cfg = load_preset("toy", **(overrides or {}))
        self.backbone = get_backbone(self.cfg.model)
        self.sampler = Sampler(self.backbone)
        self.scorer = Scorer.for_backbone(self.backbone, self.cfg.face, self.cfg.metrics.clip_model)

    def selfie(self, identity: int, folder: Path) -> Path:
        from studio.toy.world import render_prompt

        path = folder / f"selfie-{identity}.png"
        render_prompt(identity, SELFIE["prompt"], seed=SELFIE["seed"], size=SELFIE["size"]).save(path)
        return path

    def more_selfies(self, identity: int, folder: Path, count: int, kind: str = "pose") -> list[Path]:
        """``count`` further photos of the identity besides :meth:`selfie` (seeds 1, 2, ...), of
        the kind :data:`MORE_SELFIE_PROMPTS` names."""
        from studio.toy.world import render_prompt

        paths = []
        for k, prompt in enumerate(MORE_SELFIE_PROMPTS[kind][:count], start=1):
            paths.append(folder / f"selfie-{identity}-{kind}-{k}.png")
            render_prompt(identity, prompt, seed=k, size=SELFIE["size"]).save(paths[-1])
        return paths

    def train(self, photo: Path | list[Path], overrides: dict | None = None):
        from studio.events import TrainingFailed, TrainingFinished
        from studio.faces import prepare
        from studio.trainer import TrainingPhoto
        from studio.training import TrainingRun

        cfg = self.cfg.replace(**{"train.preview_every": 0, **(overrides or {})})
        photos = photo if isinstance(photo, list) else [photo]
        prepared = prepare([str(p) for p in photos], cfg.face)
        run = TrainingRun(self.backbone, cfg, [TrainingPhoto.from_prepared(p) for p in prepared.photos])
        for event in run.events():
            if isinstance(event, TrainingFailed):
                raise RuntimeError(event.message)
            if isinstance(event, TrainingFinished):
                return event.concept, cfg
        raise RuntimeError("training ended without a concept")

    def generate(self, concept, prompts, seeds, band=None, balance=None, cfg=None):
        from studio.sampler import GenerationSettings

        cfg = cfg or self.cfg
        images = []
        for prompt in prompts:
            settings = GenerationSettings.from_config(cfg, seeds=list(seeds), band=band and tuple(band), balance=balance)
            result = self.sampler(concept, [prompt], **settings.kwargs())
            images += list(result.images)
        return images

    def through_vae(self, images: list[Image.Image]) -> list[Image.Image]:
        """``images`` encoded (latent means) and decoded by the backbone's VAE."""
        import torch

        vae = self.backbone.vae
        with torch.no_grad():
            return to_images(vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample)

    def score(self, images, prompts_per_image, references):
        return self.scorer.score(images, prompts_per_image, references, self.cfg.concept.super_category)


def _expand(prompts, seeds):
    return [p for p in prompts for _ in seeds]


def identity_values(scores):
    return [s.identity.similarity for s in scores if s.identity.similarity is not None]


# --------------------------------------------------------------------------- sections
def section_base(world: World, out: Path, samples: int) -> str:
    from studio.toy.world import ATTRIBUTES

    from studio.faces import identity_embedding
    from studio.toy.world import render_prompt

    lines = ["| attribute | value | present | face found | n | renders: present | renders through the VAE: present |",
             "|---|---|---|---|---|---|---|"]
    rows, faces, ceilings = {}, [], {}
    model = world.scorer.clip
    for attribute, values in ATTRIBUTES.items():
        for value, phrases in values.items():
            if not phrases:
                continue
            phrase = phrases[0]
            prompt = (f"{phrase} a person" if attribute == "style" else f"a photo of a person {phrase}").replace("a person", "{}")
            images = world.generate(None, [prompt], list(range(samples)))
            seen = model.present(images)
            share = float(np.mean([s[attribute] == value for s in seen]))
            found = float(np.mean([identity_embedding(np.asarray(image), world.scorer.analyzer) is not None for image in images]))
            # the ceilings: ground truth of the same prompt (unseen identities), as drawn and after the VAE
            renders = [render_prompt(FIRST + i, prompt, seed=i, size=64) for i in range(samples)]
            ceiling = [float(np.mean([s[attribute] == value for s in model.present(shown)]))
                       for shown in (renders, world.through_vae(renders))]
            rows[f"{attribute}={value}"] = share
            ceilings[f"{attribute}={value}"] = ceiling
            faces.append(found)
            lines.append(f"| {attribute} | {value} | {share:.0%} | {found:.0%} | {samples} | {ceiling[0]:.0%} | {ceiling[1]:.0%} |")
            grid(images[:8], out / f"base-{attribute}-{value.replace(' ', '_')}.png")
    lines.append(f"\nAll values ≥ 90 %: **{all(v >= 0.9 for v in rows.values())}** "
                 f"(lowest: {min(rows, key=rows.get)} at {min(rows.values()):.0%}). "
                 f"Face found (the toy face step) in {np.mean(faces):.0%} of the samples.")
    (out / "base.json").write_text(json.dumps(rows, indent=2))
    (out / "base-ceilings.json").write_text(json.dumps(ceilings, indent=2))
    return "\n".join(lines)


def _reference_stats(world: World, identity: int, selfie: Path, others: int = 20):
    """Similarity of ground-truth renders (same prompts/seeds) of the identity and of other identities to the selfie."""
    from studio.toy.world import render_prompt

    refs = world.scorer.embed_references([str(selfie)])
    cells = [(p, s) for p in PROMPTS for s in SEEDS]
    same = world.score([render_prompt(identity, p, seed=100 + s) for p, s in cells], [p for p, _ in cells], refs)
    other_ids = [identity + 1000 + k for k in range(others)]
    other = world.score([render_prompt(o, p, seed=100 + s) for o in other_ids for p, s in cells],
                        [p for _ in other_ids for p, _ in cells], refs) if other_ids else []
    return refs, identity_values(same), identity_values(other), [s.prompt.score for s in same]


STRANGERS = 10  # unseen identities whose selfies (same studio scene) test whether a likeness is the person's


def stranger_refs(world: World, identity: int, out: Path) -> list[np.ndarray]:
    """Identity embeddings (D,) of STRANGERS other unseen identities' selfies."""
    return world.scorer.embed_references([str(world.selfie(identity + 2000 + k, out)) for k in range(STRANGERS)])


def likeness_to_strangers(world: World, images, strangers: list[np.ndarray]) -> tuple[float, float]:
    """Mean and std over the strangers of the images' mean identity similarity to each stranger's
    selfie: how alike the images are to people they were not trained on. Each image is embedded
    once; images without a face are left out, as in the identity column."""
    from studio.faces import identity_embedding

    analyzer = world.scorer.analyzer
    faces = [e for e in (identity_embedding(np.asarray(image), analyzer) for image in images) if e is not None]
    if not faces:
        return 0.0, 0.0
    per_stranger = [float(np.mean([analyzer.similarity(face, ref) for face in faces])) for ref in strangers]
    return float(np.mean(per_stranger)), float(np.std(per_stranger))


def section_oneshot(world: World, out: Path) -> tuple[str, dict]:
    identity = FIRST
    selfie = world.selfie(identity, out)
    t = time.perf_counter()
    concept, cfg = world.train(selfie)
    train_s = time.perf_counter() - t
    refs, real_same, real_other, real_prompt = _reference_stats(world, identity, selfie)
    images = world.generate(concept, PROMPTS, SEEDS)
    scores = world.score(images, _expand(PROMPTS, SEEDS), refs)
    base_images = world.generate(None, PROMPTS, SEEDS)
    base_scores = world.score(base_images, _expand(PROMPTS, SEEDS), refs)
    grid(images, out / "oneshot.png", cols=len(SEEDS) * 4)
    ids = identity_values(scores)
    face_rate = float(np.mean([s.identity.face_found for s in scores]))
    m_id, m_real = float(np.mean(ids)) if ids else float("nan"), float(np.mean(real_same))
    m_other, s_other = float(np.mean(real_other)), float(np.std(real_other))
    m_prompt = float(np.mean([s.prompt.score for s in scores]))
    m_base_prompt = float(np.mean([s.prompt.score for s in base_scores]))
    base_ids = identity_values(base_scores)
    strangers = stranger_refs(world, identity, out)
    m_strange, s_strange = likeness_to_strangers(world, images, strangers)
    result = dict(train_seconds=train_s, identity=m_id, face_rate=face_rate, real_render_identity=m_real,
                  to_strangers_mean=m_strange, to_strangers_std=s_strange,
                  other_identity_mean=m_other, other_identity_std=s_other, prompt=m_prompt,
                  base_prompt=m_base_prompt, real_render_prompt=float(np.mean(real_prompt)),
                  base_identity=float(np.mean(base_ids)) if base_ids else None)
    (out / "oneshot.json").write_text(json.dumps(result, indent=2))
    text = "\n".join([
        f"Identity {identity} (never seen in pretraining), one 256 px toy selfie; toy preset defaults "
        f"({cfg.train.steps} steps) trained in **{train_s:.0f} s**; {len(PROMPTS)} prompts × {len(SEEDS)} seeds.",
        "",
        "| | identity to the selfie | prompt score |",
        "|---|---|---|",
        f"| PersonaMagic (toy default) | **{m_id:.3f}** (face found {face_rate:.0%}) | **{m_prompt:.1f}** |",
        f"| ground-truth renders of the same identity | {m_real:.3f} | {np.mean(real_prompt):.1f} |",
        f"| ground-truth renders of 20 other identities | {m_other:.3f} ± {s_other:.3f} | – |",
        f"| base model, class word instead of the person | {result['base_identity'] or float('nan'):.3f} | {m_base_prompt:.1f} |",
        f"| PersonaMagic's images to {STRANGERS} *other* identities' selfies (same scene) | {m_strange:.3f} ± {s_strange:.3f} | – |",
        "",
        f"- identity ≥ 0.8 × real renders ({0.8 * m_real:.3f}): **{m_id >= 0.8 * m_real}**",
        f"- identity ≥ other identities + 3σ ({m_other + 3 * s_other:.3f}): **{m_id >= m_other + 3 * s_other}**",
        f"- prompt ≥ 0.8 × base model ({0.8 * m_base_prompt:.1f}): **{m_prompt >= 0.8 * m_base_prompt}**",
        f"- the likeness is the person's: identity ≥ the same images to strangers' selfies + 3σ "
        f"({m_strange + 3 * s_strange:.3f}): **{m_id >= m_strange + 3 * s_strange}**",
    ])
    return text, dict(concept=concept, refs=refs, selfie=selfie, strangers=strangers)


def section_sliders(world: World, out: Path, concept, refs, strangers, balances: list[float]) -> str:
    """Interval width x balance gamma on one concept; beside each setting's mean, its paired
    difference from the preset's interval at gamma 1 (same prompts and seeds, per image)."""
    bands = [(450, 650), (300, 800), (100, 950)]
    reference = (tuple(world.cfg.sample.band), 1.0)
    target = world.cfg.sample.balance_target
    lines = [f"γ acts in: **{target}** (`sample.balance_target`). Δ: paired per image against "
             f"{reference[0][0]}–{reference[0][1]} at γ 1, mean ± 95 %.", "",
             "| interval | γ | identity (95 % CI) | Δ identity | to strangers' selfies | prompt score (95 % CI) | Δ prompt | pixels moved (0–255) |",
             "|---|---|---|---|---|---|---|---|"]
    cells = {}
    for band in bands:
        for balance in balances:
            images = world.generate(concept, PROMPTS, SEEDS, band=band, balance=balance)
            cells[(band, balance)] = (images, world.score(images, _expand(PROMPTS, SEEDS), refs))
    if reference not in cells:
        images = world.generate(concept, PROMPTS, SEEDS, band=reference[0], balance=1.0)
        cells[reference] = (images, world.score(images, _expand(PROMPTS, SEEDS), refs))
    base_images, base_scores = cells[reference]
    table = {}
    for (band, balance), (images, scores) in cells.items():
        if band not in bands or balance not in balances:
            continue
        i_m, i_c = ci95(identity_values(scores))
        p_m, p_c = ci95([s.prompt.score for s in scores])
        o_m, o_s = likeness_to_strangers(world, images, strangers)
        d_id = [a.identity.similarity - b.identity.similarity for a, b in zip(scores, base_scores)
                if a.identity.similarity is not None and b.identity.similarity is not None]
        d_pr = [a.prompt.score - b.prompt.score for a, b in zip(scores, base_scores)]
        (di_m, di_c), (dp_m, dp_c) = ci95(d_id), ci95(d_pr)
        moved = float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                               for a, b in zip(images, base_images)]))
        table[f"{band[0]}-{band[1]}@{balance}"] = dict(identity=(i_m, i_c), prompt=(p_m, p_c), strangers=(o_m, o_s),
                                                     delta_identity=(di_m, di_c), delta_prompt=(dp_m, dp_c), pixels_moved=moved)
        lines.append(f"| {band[0]}–{band[1]} | {balance:g} | {i_m:.3f} ± {i_c:.3f} | {di_m:+.3f} ± {di_c:.3f} | "
                     f"{o_m:.3f} ± {o_s:.3f} | {p_m:.1f} ± {p_c:.1f} | {dp_m:+.1f} ± {dp_c:.1f} | {moved:.2f} |")
    (out / "sliders.json").write_text(json.dumps({"balance_target": target, **table}, indent=2))
    return "\n".join(lines)


VARIANTS = {
    "PersonaMagic (toy default)": {},
    "without Tandem Equilibrium (λ = 0)": {"train.te_weight": 0.0},
    "without stage regulation (identity at every step)": "no_stage",
    "without the image bypass": {"concept.use_bypass": False},
    "plain textual inversion": {"concept.method": "ti"},
}


def section_ablation(world: World, out: Path, identities: int, variants: dict) -> str:
    results: dict[str, list] = {name: [] for name in variants}
    for k in range(identities):
        identity = FIRST + 10 * k
        selfie = world.selfie(identity, out)
        refs = world.scorer.embed_references([str(selfie)])
        for name, overrides in variants.items():
            band = None
            if overrides == "no_stage":
                overrides, band = {"concept.stage_regulation": False}, (0, 1000)
            try:
                concept, cfg = world.train(selfie, overrides)
            except Exception as exc:  # a variant the engine does not offer yet
                results[name].append(f"unavailable: {exc}")
                continue
            images = world.generate(concept, PROMPTS, SEEDS, band=band, cfg=cfg)
            scores = world.score(images, _expand(PROMPTS, SEEDS), refs)
            results[name].append(dict(identity=float(np.mean(identity_values(scores) or [np.nan])),
                                      prompt=float(np.mean([s.prompt.score for s in scores]))))
        print(f"[ablation] identity {identity} done", file=sys.stderr, flush=True)
    lines = ["| variant | identity (mean ± std over identities) | prompt score | identities |", "|---|---|---|---|"]
    points = {}
    for name, rows in results.items():
        ok = [r for r in rows if isinstance(r, dict)]
        if not ok:
            lines.append(f"| {name} | {rows[0] if rows else 'n/a'} | | 0 |")
            continue
        ids, prs = [r["identity"] for r in ok], [r["prompt"] for r in ok]
        points[name] = (ids, prs)
        lines.append(f"| {name} | {np.nanmean(ids):.3f} ± {np.nanstd(ids):.3f} | {np.mean(prs):.1f} ± {np.std(prs):.1f} | {len(ok)} |")
    scatter(points, out / "ablation-scatter.png")
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=str))
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures
def grid(images, path: Path, cols: int = 8) -> None:
    if not images:
        return
    side = images[0].size[0]
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * side, rows * side), "white")
    for i, im in enumerate(images):
        canvas.paste(im, ((i % cols) * side, (i // cols) * side))
    canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST).save(path)


COLOURS = [(124, 58, 237), (220, 38, 38), (5, 150, 105), (217, 119, 6), (37, 99, 235), (107, 114, 128)]


def scatter(points: dict, path: Path) -> None:
    """Identity (x) against prompt score (y), one dot per identity and variant and a ring at each
    variant's mean, with a legend; both axes span the data (ticks say where), so that points
    crowded near a ceiling stay apart."""
    w, h, left, top, bottom, legend = 980, 540, 70, 30, 60, 400
    font = ImageFont.load_default(size=13)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    valid = [(x, y) for xs, ys in points.values() for x, y in zip(xs, ys) if x == x] or [(0.0, 0.0), (1.0, 100.0)]

    def span(values, margin):
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.1, margin)
        return lo - pad, hi + pad

    (lo_x, hi_x), (lo_y, hi_y) = span([x for x, _ in valid], 0.01), span([y for _, y in valid], 1.0)
    lo_y, hi_y = max(lo_y, 0.0), min(hi_y, 100.0)  # the score's own range; a dot at 100 sits on the frame
    x0, x1, y0, y1 = left, w - legend, top, h - bottom

    def to_px(x, y):
        return x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0), y1 - (y - lo_y) / (hi_y - lo_y) * (y1 - y0)

    d.rectangle([x0, y0, x1, y1], outline="black")
    for k in range(5):  # ticks and faint grid lines
        tx, ty = lo_x + (hi_x - lo_x) * k / 4, lo_y + (hi_y - lo_y) * k / 4
        px, py = to_px(tx, ty)
        d.line([px, y0, px, y1], fill=(230, 230, 230))
        d.line([x0, py, x1, py], fill=(230, 230, 230))
        d.text((px, y1 + 4), f"{tx:.3f}", fill="black", font=font, anchor="ma")
        d.text((x0 - 4, py), f"{ty:.1f}", fill="black", font=font, anchor="rm")
    d.text(((x0 + x1) / 2, h - 22), "identity similarity to the selfie", fill="black", font=font, anchor="ma")
    d.text((8, 8), "prompt score (0-100)", fill="black", font=font)
    for k, (name, (xs, ys)) in enumerate(points.items()):
        c = COLOURS[k % len(COLOURS)]
        pairs = [(x, y) for x, y in zip(xs, ys) if x == x]
        for x, y in pairs:
            px, py = to_px(x, y)
            d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=c, outline="black")
        if pairs:
            px, py = to_px(float(np.mean([x for x, _ in pairs])), float(np.mean([y for _, y in pairs])))
            d.ellipse([px - 10, py - 10, px + 10, py + 10], outline=c, width=3)
        d.rectangle([x1 + 14, top + 4 + 24 * k, x1 + 26, top + 16 + 24 * k], fill=c)
        d.text((x1 + 32, top + 3 + 24 * k), name.replace("λ", "lambda"), fill="black", font=font)  # the font has no λ
    d.text((x1 + 14, top + 8 + 24 * len(points)), "dots: one identity each\nrings: the variant's mean", fill=(80, 80, 80), font=font)
    img.save(path)


def main() -> int:
    global PROMPTS, SEEDS  # the run's prompt set and seeds, read by every section
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="base,oneshot,sliders,ablation")
    parser.add_argument("--out", type=Path, default=Path("bench/out/toy"))
    parser.add_argument("--base-samples", type=int, default=64)
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--steps", type=int, help="training steps (default: the toy preset's)")
    parser.add_argument("--variants", help="comma-separated subset of the ablation variants (by position, 0-based)")
    parser.add_argument("--run", type=Path, help="a pretraining run folder: its last checkpoint and VAE (default: the shipped assets/toy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a toy preset setting, e.g. --set 'sample.scheduler=euler ancestral'")
    parser.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="plain",
                        help="the prompt set of oneshot, sliders and ablation: plain (1-3 attributes each) or rich (4 each)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per prompt (0, 1, ...)")
    parser.add_argument("--balances", default="0.5,1,2", help="the sliders section's gamma values, comma-separated")
    args = parser.parse_args()
    PROMPTS, SEEDS = PROMPT_SETS[args.prompts], list(range(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    from studio.cli import parse_overrides

    overrides = {"model.source": model_source(args.run, args.out), **({"train.steps": args.steps} if args.steps else {}),
                 **parse_overrides(args.set)}
    world = World(overrides)
    started = time.perf_counter()
    sample = world.cfg.sample
    report = [f"Machine: {cpu_name()}; torch threads {__import__('torch').get_num_threads()}. Sampler: {sample.scheduler}, "
              f"{sample.steps} steps, guidance {sample.guidance_scale:g}{' (--set ' + ', '.join(args.set) + ')' if args.set else ''}. "
              f"Prompts: {args.prompts} ({len(PROMPTS)}), seeds {SEEDS[0]}–{SEEDS[-1]}.\n"]
    if "base" in sections:
        report += ["### Base model follows prompts", section_base(world, args.out, args.base_samples)]
    state = None
    if "oneshot" in sections or "sliders" in sections:
        text, state = section_oneshot(world, args.out)
        report += ["### One selfie, default training", text]
    if "sliders" in sections and state:
        balances = [float(g) for g in args.balances.split(",")]
        report += ["### Sliders", section_sliders(world, args.out, state["concept"], state["refs"], state["strangers"], balances)]
    if "ablation" in sections:
        variants = VARIANTS
        if args.variants:
            keep = {int(i) for i in args.variants.split(",")}
            variants = {k: v for i, (k, v) in enumerate(VARIANTS.items()) if i in keep}
        report += ["### Ablation", section_ablation(world, args.out, args.identities, variants)]
    report.append(f"\n(total {time.perf_counter() - started:.0f} s)")
    text = "\n\n".join(report)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
