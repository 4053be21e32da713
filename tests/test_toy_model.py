"""Known answers on the shipped toy weights (assets/toy): the backbone, the face step, the instruments."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from studio.toy import models as toy_models
from studio.toy.world import Scene, render, render_prompt

REPO = Path(__file__).resolve().parent.parent
TOY_SELFIES = sorted((REPO / "assets" / "examples" / "toy").glob("*.png"))


def test_the_toy_backbone_loads_as_a_local_diffusers_folder(toy_backbone):
    assert toy_backbone.source == "toy" and not toy_backbone.is_random
    assert toy_backbone.vae_scale_factor == 4 and toy_backbone.native_resolution == 64
    assert toy_backbone.image_encoder is not None and toy_backbone.noise_scheduler.config.prediction_type == "epsilon"
    assert toy_backbone.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_the_toy_face_step_aligns_and_masks_a_toy_selfie(toy_cfg):
    from studio.faces import prepare

    prepared = prepare([str(p) for p in TOY_SELFIES], toy_cfg.face)
    assert len(prepared.photos) == len(TOY_SELFIES) and not prepared.outliers
    for photo in prepared.photos:
        side = toy_cfg.face.crop_size
        left, right = photo.landmarks[0], photo.landmarks[1]
        assert abs(left[1] - right[1]) < 0.05 * side, "eyes level after alignment"
        assert 0.3 * side < (left[0] + right[0]) / 2 < 0.7 * side
        centre = photo.landmarks[4].astype(int)
        assert photo.mask[centre[1], centre[0]] > 0.9 and photo.mask[0, 0] < 0.1


def test_the_face_locator_finds_no_face_in_an_empty_scene(toy_cfg):
    from studio.faces import get_face_analyzer
    from studio.toy.world import render_background

    analyzer = get_face_analyzer(toy_cfg.face)
    assert analyzer.detect(np.asarray(render_background(Scene(setting="forest")))) == []
    assert len(analyzer.detect(np.asarray(render(100_020, Scene(setting="forest"))))) == 1


def test_the_identity_encoder_tells_unseen_identities_apart(toy_cfg):
    from studio.faces import get_face_analyzer, identity_embedding

    analyzer = get_face_analyzer(toy_cfg.face)
    people = range(100_030, 100_036)
    prompts = ["a photo of {} on a beach", "an oil painting of {} wearing a crown", "a photo of {} in a forest"]
    emb = {(p, k): identity_embedding(np.asarray(render_prompt(p, q, seed=k)), analyzer)
           for p in people for k, q in enumerate(prompts)}
    same = [analyzer.similarity(emb[p, 0], emb[p, k]) for p in people for k in (1, 2)]
    other = [analyzer.similarity(emb[p, 0], emb[o, 1]) for p in people for o in people if o != p]
    assert np.mean(same) > np.mean(other) + 0.2


def test_the_prompt_score_reads_ground_truth_renders():
    from studio.metrics import get_clip

    model = get_clip("toy")
    prompts = ["a photo of {} on a beach", "an oil painting of {} in a forest", "a pencil sketch of {}",
               "a photo of {} wearing a red hat in front of a red wall"]
    images = [render_prompt(100_040 + i, p, seed=i) for i, p in enumerate(prompts)]
    texts = [p.replace("{}", "person") for p in prompts]
    assert np.mean(model.cosines(images, texts)) >= 0.9
    swapped = model.cosines(images, texts[1:] + texts[:1])
    assert np.mean(swapped) < 0.5


def test_the_score_command_prints_json_for_images_made_anywhere(tmp_path):
    render_prompt(100_001, "a photo of {} on a beach", seed=5).save(tmp_path / "same.png")
    render_prompt(100_777, "a photo of {} in a forest", seed=5).save(tmp_path / "other.png")
    done = subprocess.run(
        [sys.executable, "-m", "studio", "score", "--preset", "toy", "--reference", str(TOY_SELFIES[0]),
         "--prompt", "a photo of {} on a beach", str(tmp_path / "same.png"), str(tmp_path / "other.png"), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [Path(r["image"]).name for r in rows] == ["same.png", "other.png"]
    assert rows[0]["identity"] > rows[1]["identity"]
    assert rows[0]["prompt_score"] == 100.0 and rows[1]["prompt_score"] < 100.0
    assert rows[0]["identity_model"] == "toy" and rows[0]["prompt_model"] == "toy attribute classifiers"


def test_the_studio_flow_runs_on_the_toy_preset(tmp_path, capsys):
    """train -> generate -> eval on --preset toy, through the same commands as for SD."""
    from studio.cli import main

    concept = tmp_path / "toy.safetensors"
    assert main(["train", "--preset", "toy", "--image", str(TOY_SELFIES[0]), "--steps", "4",
                 "--out", str(concept), "--seed", "0"]) == 0
    out = tmp_path / "beach.png"
    assert main(["generate", "--preset", "toy", "--concept", str(concept), "--prompt", "a photo of {} on a beach",
                 "--out", str(out), "--seed", "1", "--steps", "4"]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {} on a beach\nan oil painting of {}\n")
    assert main(["eval", "--preset", "toy", "--concept", str(concept), "--prompts", str(prompts), "--seeds", "0",
                 "--steps", "4", "--out", str(tmp_path / "eval"), "--reference", str(TOY_SELFIES[0])]) == 0
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert len(rows) == 3 and "toy attribute classifiers" in rows[1] and ",toy," in rows[1]
