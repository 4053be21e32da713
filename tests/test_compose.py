"""Composition mechanics on the tiny backbone: RSA, located regions, region-grouped attention (docs/COMPOSE.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio import attention
from studio.compose import (
    REGION_COLOURS,
    ComposeInputError,
    Composer,
    Person,
    Reference,
    boxes_from_strokes,
    locate_regions,
    side_boxes,
)
from studio.conditioning import PromptError
from studio.config import ComposeConfig, ConfigError, load_preset
from studio.sampler import Sampler
from test_sampler import make_concept

STEPS = dict(num_inference_steps=3, guidance_scale=5.0)


def photo(colour: tuple[int, int, int]) -> Reference:
    """A flat-coloured 64 px reference with a centred square face mask."""
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    return Reference(Image.new("RGB", (64, 64), colour), mask)


@pytest.fixture(scope="module")
def sampler(backbone):
    return Sampler(backbone)


@pytest.fixture(scope="module")
def composer(sampler, tiny_cfg):
    return Composer(sampler, tiny_cfg.compose)


@pytest.mark.parametrize("balance", [dict(), dict(balance=3.0, balance_target="unet"),
                                     dict(balance=0.2, balance_target="text_encoder", balance_layers=2)],
                         ids=["neutral", "unet-balance", "text-encoder-balance"])
def test_a_single_concept_without_reference_weight_is_todays_generation_bit_for_bit(backbone, sampler, tiny_cfg, balance):
    concept = make_concept(backbone, seed=3, bypass=True)
    off = Composer(sampler, ComposeConfig(rsa_weight=0.0))
    composed = off([Person(concept=concept, reference=photo((200, 80, 40)))], "a photo of {0} on a beach", seeds=[0, 1],
                   **STEPS, **balance)
    plain = sampler(concept, "a photo of {} on a beach", seeds=[0, 1], **STEPS, **balance)
    for ours, theirs in zip(composed.images, plain.images):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert composed.settings[0]["unet_passes_per_step"] == 1


def test_reference_attention_changes_the_image_and_costs_one_pass_per_reference(backbone, sampler):
    concept = make_concept(backbone, seed=3)
    on = Composer(sampler, ComposeConfig(rsa_weight=3.0, rsa_context_weight=1.0, rsa_blocks=["down_blocks", "mid_block", "up_blocks"]))
    with_photo = on([Person(concept=concept, reference=photo((250, 250, 250)))], "a photo of {0}", seeds=[0], **STEPS)
    without = sampler(concept, "a photo of {}", seeds=[0], **STEPS)
    difference = np.abs(np.asarray(with_photo.images[0], np.float32) - np.asarray(without.images[0], np.float32)).mean()
    assert difference > 0  # tiny has random weights: any change shows the references are attended
    assert with_photo.settings[0]["unet_passes_per_step"] == 2


def test_located_regions_partition_the_latent(composer):
    capture = attention.UNetAttentionControl()
    people = [Person(reference=photo((220, 60, 60))), Person(reference=photo((60, 60, 220)), class_word="man")]
    result = composer(people, "a photo of {0} and {1} on a beach", seeds=[0, 1], capture=capture, **STEPS)
    regions = capture.regions  # (n, 1 + people, h, w) on the last step
    assert regions.shape == (2, 3, 32, 32)
    assert torch.all((regions == 0) | (regions == 1))
    assert torch.all(regions.sum(1) == 1)
    for labels in result.regions:
        assert labels.shape == (32, 32) and set(np.unique(labels)) <= {0, 1, 2}
    assert result.overlays[0].size == result.images[0].size


def test_a_regions_pixels_get_no_attention_from_the_other_persons_tokens(backbone, composer):
    people = [Person(concept=make_concept(backbone, seed=1)), Person(concept=make_concept(backbone, seed=2))]
    capture = attention.UNetAttentionControl(capture_groups=True)
    composer(people, "{0} and {1} at a cafe", seeds=[0], boxes=side_boxes(2), capture=capture, **STEPS)
    # Token positions: <start> slots0(2) and slots1(2) ...; group 1 = person 0 sees slots + "face" of person 1
    tokenizer = backbone.tokenizer
    and_len = len(tokenizer("and", add_special_tokens=False).input_ids)
    person_1_in_group_1 = [1 + 2 + and_len]  # person 1 is its class word in person 0's row
    person_0_in_group_2 = [1]  # person 0 is its class word in person 1's row
    checked = 0
    for name, group, probs, pixels in capture.group_probs:
        if group == 0:
            continue
        other = person_1_in_group_1 if group == 1 else person_0_in_group_2
        inside = pixels[-1] > 0  # conditional row
        assert inside.any()
        assert torch.all(probs[-1][:, inside][..., other] == 0), name
        checked += 1
    assert checked >= 2
    # the plain prompt (background) does attend to both persons' words: the zeros above are the restriction
    plain = [probs for name, group, probs, _ in capture.group_probs if group == 0]
    assert all(p[-1][..., person_0_in_group_2 + [1 + 1 + and_len]].sum() > 0 for p in plain)


def test_boxes_give_left_and_right_regions(composer):
    people = [Person(reference=photo((220, 60, 60))), Person(reference=photo((60, 60, 220)))]
    result = composer(people, "{0} and {1}", seeds=[0], boxes=side_boxes(2), **STEPS)
    labels = result.regions[0]
    assert np.all(labels[:, :16] == 1) and np.all(labels[:, 16:] == 2)
    assert result.captions == ["{0} and {1} (seed 0)"], "the prompt as the user wrote it"


def _strokes(height: int = 100, width: int = 100) -> np.ndarray:
    """A painted RGBA layer: a red block (x 10-39, y 20-79) with a soft edge, a blue one (x 60-89, y 20-79)
    and a stray faint red dot."""
    layer = np.zeros((height, width, 4), np.uint8)
    layer[20:80, 10:40] = (*REGION_COLOURS[1], 255)
    layer[20:80, 9] = (*REGION_COLOURS[1], 90)  # anti-aliased edge: mostly transparent
    layer[20:80, 60:90] = (*REGION_COLOURS[2], 255)
    layer[95, 95] = (*REGION_COLOURS[1], 40)
    return layer


def test_drawn_strokes_give_each_person_the_box_around_their_colour(composer):
    boxes = boxes_from_strokes([_strokes()], 2)
    assert boxes == [(0.1, 0.2, 0.4, 0.8), (0.6, 0.2, 0.9, 0.8)]
    people = [Person(reference=photo((220, 60, 60))), Person(reference=photo((60, 60, 220)))]
    labels = composer(people, "{0} and {1}", seeds=[0], boxes=boxes, **STEPS).regions[0]  # 32 x 32 latent
    assert np.all(labels[6:26, 3:13] == 1) and np.all(labels[6:26, 19:29] == 2)
    assert np.all(labels[:, 14:19] == 0) and np.all(labels[:5] == 0)


def test_a_drawing_that_misses_a_person_names_the_colour_to_paint():
    only_red = _strokes()
    only_red[..., 3][np.all(only_red[..., :3] == REGION_COLOURS[2], axis=-1)] = 0
    with pytest.raises(ComposeInputError, match=r"Nothing is drawn in blue for person \{1\}"):
        boxes_from_strokes([only_red], 2)
    with pytest.raises(ComposeInputError, match="Nothing is drawn: paint where each of the 2 people goes"):
        boxes_from_strokes([], 2)
    with pytest.raises(ComposeInputError, match="colours for 4 people, not 5"):
        boxes_from_strokes([only_red], 5)
    later = np.zeros_like(only_red)
    later[20:80, 10:25] = (*REGION_COLOURS[2], 255)  # a later layer paints blue over half the red block
    assert boxes_from_strokes([only_red, later], 2) == [(0.25, 0.2, 0.4, 0.8), (0.1, 0.2, 0.25, 0.8)]
    later[20:80, 10:40] = (*REGION_COLOURS[2], 255)  # ... and then over all of it
    with pytest.raises(ComposeInputError, match=r"Nothing is drawn in red for person \{0\}"):
        boxes_from_strokes([only_red, later], 2)


@pytest.mark.parametrize("grouping", ["clusters", "tokens"])
def test_locate_regions_follows_the_persons_attention(grouping):
    # 4x4 pixels: person 0's word is attended on the left, person 1's on the right, the start token at the top row
    n, tokens, length = 1, 16, 5
    cross = torch.full((n, tokens, length), 0.01)
    grid = torch.arange(tokens).reshape(4, 4)
    cross[0, grid[1:, :2].flatten(), 1] = 1.0
    cross[0, grid[1:, 2:].flatten(), 3] = 1.0
    cross[0, grid[0].flatten(), 0] = 1.0
    identity = torch.eye(tokens)[None]
    regions = locate_regions({"a": cross}, {"s": identity}, [(1,), (3,)], n, (4, 4), smoothing=0.0, grouping=grouping)
    labels = regions.argmax(1)[0]
    assert torch.all(labels[0] == 0)
    assert torch.all(labels[1:, :2] == 1) and torch.all(labels[1:, 2:] == 2)


def _two_people_with_one_class_word():
    """4x4 pixels: the start token is attended on the top row; both people's class words (the
    same word, tokens 1 and 3) equally below it; the self-attention of the left and of the right
    people pixels stays on their own side."""
    n, tokens, length = 1, 16, 5
    grid = torch.arange(tokens).reshape(4, 4)
    cross = torch.full((n, tokens, length), 0.01)
    cross[0, grid[0].flatten(), 0] = 1.0
    cross[0, grid[1:].flatten().unsqueeze(1), torch.tensor([1, 3])] = 1.0
    attend = torch.zeros(tokens, tokens)
    for part in (grid[0].flatten(), grid[1:, :2].flatten(), grid[1:, 2:].flatten()):
        attend[part.unsqueeze(1), part] = 1.0 / len(part)
    return cross, attend[None]


def test_clusters_tell_apart_two_people_whose_class_words_are_the_same_word():
    cross, attend = _two_people_with_one_class_word()
    by_tokens = locate_regions({"a": cross}, {"s": attend}, [(1,), (3,)], 1, (4, 4), smoothing=0.0, grouping="tokens")
    assert torch.all(by_tokens.argmax(1)[0, 1:] == 1)  # a tie: every people pixel goes to {0}
    labels = locate_regions({"a": cross}, {"s": attend}, [(1,), (3,)], 1, (4, 4), smoothing=0.0).argmax(1)[0]
    assert torch.all(labels[0] == 0)
    left, right = labels[1:, :2], labels[1:, 2:]
    assert len(left.unique()) == 1 and len(right.unique()) == 1
    assert {int(left[0, 0]), int(right[0, 0])} == {1, 2}


def test_located_people_keep_their_places_from_the_last_step():
    cross, attend = _two_people_with_one_class_word()
    for left_person in (1, 2):
        previous = torch.zeros(1, 3, 4, 4)
        previous[0, 0, 0] = 1.0
        previous[0, left_person, 1:, :2] = 1.0
        previous[0, 3 - left_person, 1:, 2:] = 1.0
        labels = locate_regions({"a": cross}, {"s": attend}, [(1,), (3,)], 1, (4, 4), smoothing=0.0,
                                previous=previous).argmax(1)[0]
        assert torch.all(labels[1:, :2] == left_person) and torch.all(labels[1:, 2:] == 3 - left_person)


@pytest.mark.parametrize(
    ("prompt", "count", "words"),
    [
        ("{0} at a cafe", 2, "each of the 2 people once"),
        ("{0} and {0} at a cafe", 2, "each of the 2 people once"),
        ("{} and {1}", 2, "Number the people"),
        ("{0}s and {1}", 2, "Put spaces around {0}"),
    ],
)
def test_prompts_whose_placeholders_do_not_match_the_people_are_refused(composer, prompt, count, words):
    people = [Person(reference=photo((200, 200, 200)))] * count
    with pytest.raises(PromptError) as info:
        composer.check_inputs(people, prompt, **STEPS)
    if words:
        assert words in str(info.value)


def test_more_people_than_the_maximum_are_refused(composer):
    people = [Person(reference=photo((200, 200, 200)))] * 3
    with pytest.raises(ComposeInputError, match="at most 2"):
        composer.check_inputs(people, "{0}, {1} and {2}", **STEPS)


def test_concepts_of_different_models_are_refused(backbone, composer):
    people = [Person(concept=make_concept(backbone)), Person(concept=make_concept(backbone, source="some/fine-tune"))]
    with pytest.raises(ComposeInputError, match="different models"):
        composer.check_inputs(people, "{0} and {1}", **STEPS)


def test_a_person_needs_a_concept_or_a_photo(composer):
    with pytest.raises(ComposeInputError, match="neither a concept nor a photo"):
        composer.check_inputs([Person(), Person(reference=photo((1, 2, 3)))], "{0} and {1}", **STEPS)


def test_boxes_for_a_naive_composition_are_refused_not_ignored(composer):
    people = [Person(reference=photo((200, 200, 200)))] * 2
    with pytest.raises(ComposeInputError, match="Naive composition has no regions to place"):
        composer.check_inputs(people, "{0} and {1}", mode="naive", boxes=side_boxes(2), **STEPS)
    composer.check_inputs(people, "{0} and {1}", mode="regions", boxes=side_boxes(2), **STEPS)


def test_bad_boxes_are_refused(composer):
    people = [Person(reference=photo((200, 200, 200)))] * 2
    with pytest.raises(ComposeInputError, match="0 <= x0 < x1 <= 1"):
        composer.check_inputs(people, "{0} and {1}", boxes=[(0.5, 0, 0.2, 1), (0.5, 0, 1, 1)], **STEPS)


def test_compose_config_is_checked():
    with pytest.raises(ConfigError, match="compose.max_people"):
        load_preset("tiny", **{"compose.max_people": 9})
    with pytest.raises(ConfigError, match="compose.rsa_blocks"):
        load_preset("tiny", **{"compose.rsa_blocks": ["decoder"]})
    with pytest.raises(ConfigError, match=r"compose.aspect \(width / height\) must be from 1 to 3, got 5"):
        load_preset("tiny", **{"compose.aspect": 5})
    with pytest.raises(ConfigError, match="compose.locate_grouping must be one of clusters, tokens, got 'kmeans'"):
        load_preset("tiny", **{"compose.locate_grouping": "kmeans"})
    with pytest.raises(ConfigError, match="compose.locate_compactness must be >= 0, got -1"):
        load_preset("tiny", **{"compose.locate_compactness": -1})


def test_two_people_get_a_wide_picture_and_one_person_a_square(backbone, sampler):
    multiple = 8 * backbone.vae_scale_factor
    wide = Composer(sampler, ComposeConfig(aspect=2.0))
    assert wide.canvas(64, 1) == (64, 64)
    assert wide.canvas(64, 2) == (64, 128)
    assert Composer(sampler, ComposeConfig(aspect=1.5)).canvas(512, 3) == (512, 768)
    height, width = Composer(sampler, ComposeConfig(aspect=1.3)).canvas(64, 2)  # 83.2 px: rounded to the model's multiple
    assert height == 64 and width % multiple == 0 and abs(width - 83.2) <= multiple / 2


def test_the_engine_composes_concept_files_and_refuses_an_instant_preview_without_photos(backbone, tiny_cfg, tmp_path):
    from studio.compose import PersonSource
    from studio.concept_file import save_concept
    from studio.engine import Engine

    files = [save_concept(make_concept(backbone, seed=s), tmp_path / f"{s}.safetensors") for s in (5, 6)]
    engine = Engine(tiny_cfg, session_id="compose-test")
    try:
        with pytest.raises(ComposeInputError, match="needs this session's photos"):
            engine.instant_preview(num_inference_steps=1)
        with pytest.raises(ComposeInputError, match="no concept in this session"):
            engine.compose([PersonSource("session"), PersonSource("file", str(files[0]))], "{0} and {1}")
        result, scores = engine.compose([PersonSource("file", str(f)) for f in files], "{0} and {1} in a park",
                                        boxes=side_boxes(2), seeds=[3], num_inference_steps=2)
        assert len(result.images) == 1 and result.settings[0]["seed"] == 3
        assert result.images[0].size == (96, 64)  # two people: the wide picture (tiny: 64 px, aspect 1.5)
        assert scores == [[None, None]]  # concept files carry no photos to compare with
    finally:
        engine.close()
