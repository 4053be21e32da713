"""Sweeps over band × balance and the `eval` command, on the tiny backbone (images are noise)."""
from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

from studio.concept import Concept
from studio.conditioning import PromptError, super_category_id
from studio.metrics import Scorer
from studio.sampler import GenerationSettings, Sampler
from studio.sweep import EVAL_PROMPTS_FILE, SweepPoint, pick_balanced, read_prompt_file, sweep

PROMPTS = ["a photo of {}", "{} playing the guitar"]
# With dpmsolver++ at 2 steps the timesteps are 999 and 500: band (450, 900) gives step 500
# the mapper's tokens, band (100, 400) gives both steps the super-category word.
BANDS = [(100, 400), (450, 900)]
FAST = dict(settings=GenerationSettings(num_inference_steps=2, guidance_scale=1.0, scheduler="dpmsolver++"))


@pytest.fixture(scope="module")
def concept(backbone, tiny_cfg) -> Concept:
    """A concept whose mapper makes tokens other than the super-category word (random head)."""
    from studio.mapper import IdentityMapper

    word = super_category_id(backbone.tokenizer, "face")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mapper = IdentityMapper(
            backbone.text_encoder.get_input_embeddings().weight[word],
            num_tokens=2, band=(100, 900), num_anchors=8, hidden_dim=16, time_encoding_dim=32,
        )
        torch.nn.init.normal_(mapper.head.weight, std=0.5)
    return Concept(
        mapper=mapper.eval().requires_grad_(False), super_category="face", train_band=(100, 900),
        late_stage="band_edge", backbone=backbone.fingerprint(), config=tiny_cfg.to_dict(),
    )


@pytest.fixture(scope="module")
def sampler(backbone) -> Sampler:
    return Sampler(backbone)


@pytest.fixture(scope="module")
def scorer(backbone, tiny_cfg) -> Scorer:
    return Scorer.for_backbone(backbone, tiny_cfg.face)


@pytest.fixture(scope="module")
def reference(faces_dir):
    return faces_dir / "single" / "f2d_0.jpg"


# ----------------------------------------------------------------------------- sweep
def test_sweep_yields_one_scored_point_per_setting_band_major(sampler, concept, scorer, reference):
    points = list(sweep(sampler, concept, PROMPTS, [7], BANDS, [0.5, 2.0], scorer, [reference], **FAST))

    assert [(p.band, p.balance) for p in points] == [(b, g) for b in BANDS for g in (0.5, 2.0)]
    for point in points:
        assert len(point.images) == len(point.scores) == len(PROMPTS)
        assert [s.prompt.text for s in point.scores] == ["a photo of face", "face playing the guitar"]
        # Tiny outputs are noise: no face, so no identity score, and that is not a zero.
        assert point.face_rate == 0.0 and point.mean_identity is None
        assert point.mean_prompt == pytest.approx(sum(s.prompt.score for s in point.scores) / len(PROMPTS))
    # The band reaches the sampler: inside it the mapper's tokens change the image.
    early, inside = points[0].images[0], points[2].images[0]
    assert early.tobytes() != inside.tobytes()


def test_sweep_stops_between_settings_when_asked(sampler, concept, scorer):
    points: list[SweepPoint] = []
    for point in sweep(sampler, concept, PROMPTS[:1], [0], BANDS, [1.0, 2.0], scorer,
                       should_stop=lambda: len(points) >= 1, **FAST):
        points.append(point)
    assert len(points) == 1
    assert (points[0].band, points[0].balance) == (BANDS[0], 1.0)


def test_a_stop_during_a_setting_drops_that_setting_and_ends_cleanly(sampler, concept, scorer):
    checks = []

    def stop_after_first_step() -> bool:
        # 1st check: before the first setting; 2nd: after its first denoising step.
        checks.append(None)
        return len(checks) >= 2

    points = list(sweep(sampler, concept, PROMPTS[:1], [0], BANDS, [1.0], scorer,
                        should_stop=stop_after_first_step, **FAST))
    assert points == []
    assert len(checks) == 2


def _point(identity: float | None, face_rate: float, prompt: float, balance: float) -> SweepPoint:
    return SweepPoint(band=(400, 800), balance=balance, images=(), scores=(), mean_identity=identity,
                      face_rate=face_rate, mean_prompt=prompt)


def test_pick_balanced_prefers_the_setting_whose_weaker_score_is_best():
    identity_heavy = _point(0.9, 1.0, 10.0, balance=2.0)
    balanced = _point(0.6, 1.0, 25.0, balance=1.0)
    prompt_heavy = _point(0.2, 1.0, 30.0, balance=0.5)
    assert pick_balanced([identity_heavy, balanced, prompt_heavy]) is balanced


def test_pick_balanced_counts_lost_faces_against_a_setting():
    # On faces found alone, lost_faces would win (identity 0.9, prompt 28 vs 0.7, 26); but it
    # kept a face in one image of four, and that ranks it below the steady setting.
    lost_faces = _point(0.9, 0.25, 28.0, balance=0.5)
    steady = _point(0.7, 1.0, 26.0, balance=1.0)
    prompt_end = _point(0.2, 1.0, 30.0, balance=0.3)
    identity_end = _point(0.95, 1.0, 20.0, balance=3.0)
    assert pick_balanced([lost_faces, steady, prompt_end, identity_end]) is steady


def test_pick_balanced_without_identity_scores_goes_by_the_prompt():
    points = [_point(None, 0.0, p, balance=g) for p, g in ((20.0, 1.0), (28.0, 0.5), (24.0, 2.0))]
    assert pick_balanced(points).balance == 0.5


# ----------------------------------------------------------------------------- prompts file
def test_the_shipped_eval_prompts_cover_many_prompts_each_with_the_person():
    prompts = read_prompt_file(EVAL_PROMPTS_FILE)
    assert len(prompts) >= 20
    assert all(p.count("{}") == 1 for p in prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_a_prompt_file_line_without_the_person_is_named(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# mine\na photo of {}\n\na red car\n", encoding="utf-8")
    with pytest.raises(PromptError, match="line 4"):
        read_prompt_file(path)


# ----------------------------------------------------------------------------- eval command
@pytest.fixture(scope="module")
def concept_file(concept, tmp_path_factory):
    from studio.concept_file import save_concept

    path = tmp_path_factory.mktemp("concept") / "person.safetensors"
    save_concept(concept, path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_eval_writes_one_row_per_prompt_seed_and_setting_and_a_grid(concept_file, prompts_file, reference, tmp_path, capsys):
    from studio.cli_eval import CSV_COLUMNS, main

    out = tmp_path / "eval"
    code = main([
        "--preset", "tiny", "--concept", str(concept_file), "--prompts", str(prompts_file),
        "--seeds", "1", "2", "--out", str(out), "--band", "100", "400", "--band", "450", "900",
        "--balance", "1.0", "--reference", str(reference), "--steps", "2",
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err

    with (out / "scores.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(rows) == len(PROMPTS) * 2 * len(BANDS)
    cells = {(r["prompt"], r["seed"], r["band_lo"], r["band_hi"], r["balance"]) for r in rows}
    assert len(cells) == len(rows)
    assert {r["prompt"] for r in rows} == set(PROMPTS)
    assert {(r["band_lo"], r["band_hi"]) for r in rows} == {("100", "400"), ("450", "900")}
    # Noise images: no face found, identity left empty (not 0), models named.
    assert all(r["face_found"] == "False" and r["identity"] == "" for r in rows)
    assert {r["identity_model"] for r in rows} == {"dlib"}
    assert {r["prompt_model"] for r in rows} == {"tiny-clip (random weights)"}
    assert all(0.0 <= float(r["prompt_score"]) <= 100.0 for r in rows)

    grid = Image.open(out / "grid.png")
    first_tiny_image_side = 128  # 64 px tiny images are shown at the 128 px minimum cell size
    assert grid.width > 2 * len(PROMPTS) * first_tiny_image_side
    assert grid.height > len(BANDS) * first_tiny_image_side
    # The per-setting table: one line per setting after the header and rule.
    table = printed.out.strip().splitlines()
    assert len(table) == 2 + len(BANDS)
    assert table[2].split()[0] == "100-400" and table[3].split()[0] == "450-900"


def test_eval_without_references_says_identity_cannot_be_scored(concept_file, prompts_file, tmp_path, capsys):
    from studio.cli_eval import main

    out = tmp_path / "eval"
    code = main(["--concept", str(concept_file), "--prompts", str(prompts_file), "--seeds", "0",
                 "--out", str(out), "--steps", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "identity similarity cannot be scored" in printed.err
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    assert len(rows) == len(PROMPTS)  # one seed, the preset's one band and balance


def test_eval_refuses_a_missing_concept_file_with_a_message(prompts_file, tmp_path, capsys):
    from studio.cli_eval import main

    code = main(["--concept", str(tmp_path / "nope.safetensors"), "--prompts", str(prompts_file), "--out", str(tmp_path)])
    assert code == 2
    assert "concept file not found" in capsys.readouterr().err
    assert not (tmp_path / "scores.csv").exists()

