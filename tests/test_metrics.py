"""Identity and prompt scores: real face backend on real photos, tiny CLIP offline."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from studio.faces import PhotoError
from studio.metrics import (
    ClipUnavailable,
    IdentityScore,
    ImageScores,
    PromptScore,
    Scorer,
    caption,
    default_clip_model,
    get_clip,
    scoring_text,
)


@pytest.fixture(scope="module")
def scorer(tiny_cfg):
    return Scorer(tiny_cfg.face, clip_model="tiny")


@pytest.fixture(scope="module")
def photos(faces_dir):
    def load(name: str) -> Image.Image:
        return Image.open(faces_dir / "single" / name).convert("RGB")

    return {"person": load("f2d_0.jpg"), "other": load("f2d_1.jpg")}


@pytest.fixture(scope="module")
def tiny_output(backbone) -> Image.Image:
    """What the tiny backbone makes: random latents through its VAE decoder."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    with torch.no_grad():
        pixels = backbone.vae.decode(latents).sample[0]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def test_identity_is_near_the_top_for_the_same_photo_and_its_mirror_and_low_for_another_person(scorer, photos):
    person, other = photos["person"], photos["other"]
    images = [person, ImageOps.mirror(person), other]
    scores = scorer.score(images, ["a photo of {}"] * 3, references=[person])
    same, mirrored, different = (s.identity for s in scores)

    assert all(s.face_found for s in (same, mirrored, different))
    assert same.model == scorer.analyzer.name
    assert same.similarity == pytest.approx(1.0, abs=1e-6)
    assert mirrored.similarity > 0.75
    # The backend's same-person threshold sits at 0.5 on this scale.
    assert different.similarity < 0.5
    assert mirrored.similarity - different.similarity > 0.3


def test_identity_against_several_references_is_the_mean(scorer, photos):
    person, other = photos["person"], photos["other"]
    references = scorer.embed_references([person, other])
    alone = [scorer.score([person], ["{}"], [ref])[0].identity.similarity for ref in references]
    both = scorer.score([person], ["{}"], references)[0].identity.similarity
    assert both == pytest.approx(np.mean(alone))
    assert min(alone) < both < max(alone)


@pytest.mark.parametrize("kind", ["flat gray", "tiny backbone output"])
def test_an_image_without_a_face_is_reported_as_such_not_scored_zero(scorer, photos, tiny_output, kind):
    image = Image.new("RGB", (256, 256), (128, 128, 128)) if kind == "flat gray" else tiny_output
    result = scorer.score([image], ["a photo of {}"], references=[photos["person"]])[0]
    assert result.identity.face_found is False
    assert result.identity.similarity is None
    assert result.caption.startswith("no face · prompt ")


def test_without_references_a_face_is_still_reported(scorer, photos):
    result = scorer.score([photos["person"]], ["a photo of {}"])[0]
    assert result.identity == IdentityScore(similarity=None, face_found=True, model=scorer.analyzer.name)


def test_a_reference_photo_without_a_face_is_refused_with_its_name(scorer, tmp_path):
    path = tmp_path / "wall.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(path)
    with pytest.raises(PhotoError, match="wall.png"):
        scorer.embed_references([path])


def test_a_reference_embedding_from_another_face_backend_is_refused(scorer):
    wrong_width = np.zeros(scorer.analyzer.embedding_dim + 1, np.float32)
    with pytest.raises(PhotoError, match="same face backend"):
        scorer.embed_references([wrong_width])


def test_prompt_score_on_tiny_clip_is_deterministic_names_its_model_and_depends_on_the_text(scorer, photos, tiny_output):
    images = [photos["person"], tiny_output, photos["person"]]
    prompts = ["a photo of {}", "an oil painting of {} on the beach", "{} wearing a spacesuit"]
    first = scorer.score(images, prompts, super_category="man")
    again = Scorer(scorer.face_config, clip_model="tiny").score(images, prompts, super_category="man")

    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert all(s.prompt.model == "tiny-clip (random weights)" for s in first)
    assert all(s.prompt.score == pytest.approx(100 * max(s.prompt.cosine, 0.0)) for s in first)
    assert first[0].prompt.text == "a photo of man"
    # Same image, different text: CLIP reads the prompt (the raw cosine: random CLIP scores clip at 0).
    assert first[0].prompt.cosine != first[2].prompt.cosine


def test_scoring_text_puts_the_super_category_word_in_place_of_the_person():
    assert scoring_text("a photo of {} as a chef", "face") == "a photo of face as a chef"
    assert scoring_text("{} playing the guitar", "woman") == "woman playing the guitar"


def test_captions_are_short_and_distinguish_no_face_from_no_reference():
    prompt = PromptScore(score=24.34, model="m")
    assert caption(ImageScores(IdentityScore(0.712, True, "dlib"), prompt)) == "id 0.71 · prompt 24.3"
    assert caption(ImageScores(IdentityScore(None, False, "dlib"), prompt)) == "no face · prompt 24.3"
    assert caption(ImageScores(IdentityScore(None, True, "dlib"), prompt)) == "face · prompt 24.3"


def test_default_clip_is_tiny_only_on_the_random_backbone(backbone):
    assert default_clip_model(backbone) == "tiny"


def test_an_uncached_hub_clip_fails_fast_offline_with_advice():
    started = time.perf_counter()
    with pytest.raises(ClipUnavailable, match="hf download nobody/no-such-clip") as err:
        get_clip("nobody/no-such-clip")
    assert time.perf_counter() - started < 5.0
    assert "tiny" in str(err.value)


def test_a_clip_source_that_is_neither_folder_nor_hub_id_is_refused(tmp_path):
    with pytest.raises(ClipUnavailable, match="neither a folder"):
        get_clip(str(tmp_path / "missing" / "clip"))


def test_a_clip_saved_to_a_folder_loads_from_it_and_scores_like_the_original(scorer, photos, tmp_path):
    from studio.metrics import tiny_clip

    model, tokenizer, processor = tiny_clip()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)

    loaded = get_clip(str(folder))
    assert loaded.name == str(folder)
    images, texts = [photos["person"], photos["other"]], ["a photo of face", "face on the beach"]
    assert loaded.cosines(images, texts) == pytest.approx(get_clip("tiny").cosines(images, texts), abs=1e-5)
