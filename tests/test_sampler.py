"""Stage-regulated generation: stage schedule, determinism, caching, settings that matter, bad input."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from studio.concept import Concept
from studio.conditioning import PromptError, Stage, super_category_id
from studio.mapper import IdentityMapper
from studio.sampler import SCHEDULERS, GenerationInterrupted, Sampler, stage_plan

# Small images and few steps keep these fast on 2 cores; 32 px is a valid tiny size (multiple of 16).
FAST = dict(num_inference_steps=3, height=32, width=32, guidance_scale=4.0)


def make_concept(
    backbone, *, seed: int = 0, scale: float = 0.5, bypass: bool = False, late_stage: str = "band_edge",
    source: str | None = None,
) -> Concept:
    """A concept without the trainer: a mapper on the super-category word with random head weights
    (zero heads would say exactly the word), optionally with a random image bypass."""
    word_id = super_category_id(backbone.tokenizer, "face")
    word = backbone.text_encoder.get_input_embeddings().weight[word_id]
    mapper = IdentityMapper(
        word, num_tokens=2, band=(200, 900), num_anchors=8, hidden_dim=16, time_encoding_dim=32,
        image_embed_dim=backbone.image_embed_dim if bypass else None,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mapper.head.weight.copy_(torch.randn(mapper.head.weight.shape, generator=generator) * scale)
        mapper.head.bias.copy_(torch.randn(mapper.head.bias.shape, generator=generator) * scale)
        if bypass:
            last = mapper.bypass[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 5 * scale)
    embedding = torch.randn(backbone.image_embed_dim, generator=generator) if bypass else None
    fingerprint = backbone.fingerprint()
    if source is not None:  # another model: another source and other weights
        fingerprint.update(source=source, model_id=f"weights of {source}")
    return Concept(
        mapper=mapper.eval().requires_grad_(False), super_category="face", train_band=(200, 900),
        late_stage=late_stage, backbone=fingerprint, image_embedding=embedding, steps_done=7,
        config={"note": "made by tests"},
    )


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


@pytest.fixture(scope="module")
def concept(backbone):
    return make_concept(backbone)


@pytest.fixture()
def sampler(backbone):
    return Sampler(backbone)


# --------------------------------------------------------------------------- stage schedule
@pytest.mark.parametrize(
    "scheduler, steps", [("dpmsolver++", 20), ("ddim", 50), ("euler", 10), ("dpmsolver++ karras", 20)]
)
@pytest.mark.parametrize("band", [(400, 800), (0, 1000), (0, 1), (999, 1000), (402, 418)])
def test_each_scheduler_timestep_gets_the_stage_of_its_band(backbone, scheduler, steps, band):
    lo, hi = band
    plan = stage_plan(backbone, scheduler, steps, band)
    timesteps = [step.timestep for step in plan]
    assert len(plan) == steps and timesteps == sorted(timesteps, reverse=True)
    for step in plan:
        if step.timestep > hi:
            assert (step.stage, step.mapper_timestep) == (Stage.EARLY, None)
        elif step.timestep >= lo:
            assert (step.stage, step.mapper_timestep) == (Stage.DYNAMIC, step.timestep)
        else:  # late steps reuse the band's lower edge (authors' recipe)
            assert (step.stage, step.mapper_timestep) == (Stage.LATE, lo)


def test_stage_counts_for_known_timesteps(backbone):
    # DDIM, 50 steps, SD's "leading" spacing with offset 1: 981, 961, ..., 1.
    plan = stage_plan(backbone, "ddim", 50, (401, 801))
    assert [p.timestep for p in plan] == list(range(981, 0, -20))
    stages = [p.stage for p in plan]
    assert stages.count(Stage.EARLY) == 9  # 981..821
    assert stages.count(Stage.DYNAMIC) == 21  # 801..401, both edges included
    assert stages.count(Stage.LATE) == 20  # 381..1
    # A band between two timesteps holds none of them: no step gets mapper(t).
    empty = stage_plan(backbone, "ddim", 50, (402, 418))
    assert Stage.DYNAMIC not in [p.stage for p in empty]
    late_word = stage_plan(backbone, "ddim", 50, (402, 418), late_stage="super_category")
    assert all(p.mapper_timestep is None for p in late_word)


@pytest.mark.parametrize("band", [(300, 700), (0, 1000), (402, 418)])
def test_sampler_asks_the_mapper_for_exactly_the_planned_timesteps(backbone, band):
    concept = make_concept(backbone, seed=3)
    asked: list[int] = []
    hook = concept.mapper.register_forward_hook(lambda module, inputs, output: asked.extend(inputs[0].tolist()))
    try:
        Sampler(backbone)(concept, "a photo of {}", scheduler="ddim", band=band, **FAST)
    finally:
        hook.remove()
    planned = {p.mapper_timestep for p in stage_plan(backbone, "ddim", FAST["num_inference_steps"], band)} - {None}
    assert sorted(asked) == sorted(planned)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_image_other_seed_other_image(backbone, concept, sampler):
    first = sampler(concept, "a photo of {}", seeds=[0, 1], **FAST)
    again = Sampler(backbone)(concept, "a photo of {}", seeds=[0, 1], **FAST)  # fresh cache
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again)))
    a, b = pixels(first)
    assert np.abs(a - b).mean() > 5


def test_prompt_major_order_and_batch_independence(concept, sampler):
    result = sampler(concept, ["a photo of {}", "{} as a chef"], seeds=[5, 6], **FAST)
    assert [(s["prompt"], s["seed"]) for s in result.settings] == [
        ("a photo of {}", 5), ("a photo of {}", 6), ("{} as a chef", 5), ("{} as a chef", 6)
    ]
    assert result.captions[3] == "{} as a chef (seed 6)"
    # An image does not depend on what else was in the batch (per-image generators).
    alone = sampler(concept, "{} as a chef", seeds=6, **FAST)
    assert np.abs(pixels(alone)[0] - pixels(result)[3]).max() <= 1


def test_every_scheduler_generates(backbone, concept, sampler):
    for name in SCHEDULERS:
        result = sampler(concept, "a photo of {}", scheduler=name, num_inference_steps=2, height=32, width=48, guidance_scale=0)
        assert result.images[0].size == (48, 32), name
        assert result.settings[0]["scheduler"] == name


def test_default_size_is_the_backbone_native_resolution(backbone, concept, sampler):
    result = sampler(concept, "a photo of {}", num_inference_steps=1, guidance_scale=0)
    assert result.images[0].size == (backbone.native_resolution,) * 2 == (64, 64)


# --------------------------------------------------------------------------- caching
def test_seed_and_band_changes_reuse_the_text_encoding(backbone, concept, sampler):
    sampler(concept, "a photo of {}", seeds=0, band=(0, 1000), scheduler="ddim", **FAST)
    assert sampler.text_encoder_calls == 1
    sampler(concept, "a photo of {}", seeds=[3, 4], band=(0, 1000), scheduler="ddim", **FAST)
    assert sampler.text_encoder_calls == 1  # new seeds: UNet only
    # DDIM 3 steps: 667, 334, 1. A band whose lower edge is one of them needs no new row.
    sampler(concept, "a photo of {}", seeds=0, band=(334, 700), scheduler="ddim", **FAST)
    assert sampler.text_encoder_calls == 1
    # A new lower edge for the late stage needs one more row: one more (batched) pass.
    sampler(concept, "a photo of {}", seeds=0, band=(500, 700), scheduler="ddim", **FAST)
    assert sampler.text_encoder_calls == 2
    sampler(concept, "a photo of {}", seeds=0, band=(500, 700), scheduler="ddim", balance=0.5, **FAST)
    assert sampler.text_encoder_calls == 2  # the balance acts on the UNet's keys (the default)
    sampler(concept, "a photo of {}", seeds=0, band=(500, 700), scheduler="ddim", balance=0.5,
            balance_target="text_encoder", **FAST)
    assert sampler.text_encoder_calls == 3  # this balance acts inside the text encoder
    sampler(make_concept(backbone, seed=9), "a photo of {}", band=(500, 700), scheduler="ddim", **FAST)
    assert sampler.text_encoder_calls == 4  # other weights (new uid)


def test_cache_is_bounded_least_recently_used(backbone, concept):
    sampler = Sampler(backbone, cache_size=2)
    run = dict(num_inference_steps=1, height=32, width=32, guidance_scale=0, band=(0, 1000))
    for prompt in ("a photo of {}", "{} in a park", "{} at the sea"):
        sampler(concept, prompt, **run)
    assert sampler.cached_groups == 2 and sampler.text_encoder_calls == 3
    sampler(concept, "{} at the sea", **run)
    assert sampler.text_encoder_calls == 3  # still cached
    sampler(concept, "a photo of {}", **run)
    assert sampler.text_encoder_calls == 4  # evicted, encoded again


def test_concurrent_calls_match_sequential_ones(backbone, concept):
    prompts = ["a photo of {}", "{} reading a book"]
    expected = [pixels(Sampler(backbone)(concept, p, **FAST))[0] for p in prompts]
    shared, results, errors = Sampler(backbone), {}, []

    def work(prompt: str) -> None:
        try:
            results[prompt] = pixels(shared(concept, prompt, **FAST))[0]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for prompt, image in zip(prompts, expected):
        assert np.abs(results[prompt] - image).max() <= 1


# --------------------------------------------------------------------------- settings that matter
@pytest.mark.parametrize("target", ["unet", "text_encoder"])
def test_balance_changes_the_image(concept, sampler, target):
    # The random 2-layer text encoder of the tiny model reacts weakly to attention re-weighting,
    # so this checks that gamma reaches the pixels, not how much.
    where = dict(balance_layers=2, balance_target=target)
    neutral = pixels(sampler(concept, "a photo of {} as a chef", balance=1.0, **where, **FAST))[0]
    prompt_first = pixels(sampler(concept, "a photo of {} as a chef", balance=0.05, **where, **FAST))[0]
    again = pixels(sampler(concept, "a photo of {} as a chef", balance=1.0, **where, **FAST))[0]
    assert not np.array_equal(neutral, prompt_first)
    assert np.array_equal(neutral, again)


def test_a_neutral_balance_is_the_same_image_wherever_it_acts(concept, sampler):
    in_unet = pixels(sampler(concept, "a photo of {} as a chef", balance=1.0, balance_target="unet", **FAST))[0]
    in_text = pixels(sampler(concept, "a photo of {} as a chef", balance=1.0, balance_target="text_encoder", **FAST))[0]
    assert np.array_equal(in_unet, in_text)


def test_the_unet_balance_reuses_the_text_rows_and_leaves_rows_without_identity_alone(backbone, sampler):
    concept = make_concept(backbone, seed=4, late_stage="super_category")
    sampler(concept, "a photo of {} in the rain", balance=1.0, balance_target="unet", **FAST)
    calls = sampler.text_encoder_calls
    moved = pixels(sampler(concept, "a photo of {} in the rain", balance=3.0, balance_target="unet", **FAST))[0]
    neutral = pixels(sampler(concept, "a photo of {} in the rain", balance=1.0, balance_target="unet", **FAST))[0]
    assert sampler.text_encoder_calls == calls  # gamma on the UNet's keys needs no new text rows
    assert not np.array_equal(moved, neutral)
    # no step inside the band: every row is plain text, so there is nothing for gamma to weigh
    outside = dict(band=(998, 999), scheduler="ddim", balance_target="unet")
    assert np.array_equal(pixels(sampler(concept, "a photo of {}", balance=3.0, **outside, **FAST))[0],
                          pixels(sampler(None, "a photo of {}", scheduler="ddim", **FAST))[0])


def test_the_unet_balance_multiplies_the_attention_odds_of_the_identity_keys():
    from diffusers.models.attention_processor import Attention

    from studio.attention import BypassAttnProcessor, balance_bias

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, processor=BypassAttnProcessor()).eval()
    pixels_in, text = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    identity = torch.tensor([[False, True, True, False], [False, False, False, False]])
    gamma = 3.0
    with torch.no_grad():
        got = attn(pixels_in, encoder_hidden_states=text, key_bias=balance_bias(identity, gamma))
        # by hand: softmax(q k^T / sqrt(d) + log gamma at the identity keys) v, per head
        q, k, v = (x.view(2, -1, 2, 4).transpose(1, 2) for x in (attn.to_q(pixels_in), attn.to_k(text), attn.to_v(text)))
        probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + torch.log(torch.where(identity, gamma, 1.0))[:, None, None], -1)
        expected = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(2, 5, 8))
        assert torch.allclose(got, expected, atol=1e-5)
        plain = attn(pixels_in, encoder_hidden_states=text)
        assert torch.allclose(got[1], plain[1], atol=1e-6)  # a row without identity keys is unchanged
        assert not torch.allclose(got[0], plain[0], atol=1e-3)
        # self-attention layers get the same keyword from diffusers and ignore it
        own = Attention(query_dim=8, heads=2, dim_head=4, processor=BypassAttnProcessor()).eval()
        assert torch.equal(own(pixels_in, key_bias=torch.ones(2, 5)), own(pixels_in))


def test_band_decides_where_the_identity_acts(backbone, sampler):
    concept = make_concept(backbone, seed=1, late_stage="super_category")
    everywhere = pixels(sampler(concept, "a photo of {}", band=(0, 1000), **FAST))[0]
    # No timestep in (998, 999) and late steps get the word: the concept then plays no part.
    nowhere = pixels(sampler(concept, "a photo of {}", band=(998, 999), scheduler="ddim", **FAST))[0]
    plain = pixels(sampler(None, "a photo of {}", scheduler="ddim", **FAST))[0]
    assert np.array_equal(nowhere, plain)
    assert np.abs(everywhere - plain).mean() > 1


def test_image_bypass_changes_the_values(backbone, sampler):
    with_bypass = make_concept(backbone, seed=2, bypass=True)
    without = dataclasses.replace(with_bypass, image_embedding=None, uid="no-embedding")
    a = pixels(sampler(with_bypass, "a photo of {}", band=(0, 1000), **FAST))[0]
    b = pixels(sampler(without, "a photo of {}", band=(0, 1000), **FAST))[0]
    # Generation is deterministic (tests above), so any difference comes from the bypassed values.
    assert not np.array_equal(a, b)


def test_plain_generation_without_a_concept(sampler):
    result = sampler(None, ["a photo of {}", "a red car"], seeds=0, **FAST)
    assert len(result.images) == 2 and result.settings[0]["concept_uid"] is None
    assert result.settings[0]["identity_steps"] == 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "prompt, kwargs, error, match",
    [
        ("   ", {}, PromptError, "prompt is empty"),
        ("a photo of a man", {}, PromptError, r"has no \{\} for the person"),
        ("{} and {}", {}, PromptError, "once per prompt"),
        ("a photo of {}", {"band": (800, 400)}, ValueError, "must start before it ends.*got start 800, end 400"),
        ("a photo of {}", {"band": (500, 500)}, ValueError, "must start before it ends.*got start 500, end 500"),
        ("a photo of {}", {"scheduler": "lms"}, ValueError, "Unknown scheduler 'lms'; choose one of: dpmsolver\\+\\+"),
        ("a photo of {}", {"num_inference_steps": 0}, ValueError, "number of steps"),
        ("a photo of {}", {"guidance_scale": -1.0}, ValueError, "guidance scale"),
        ("a photo of {}", {"balance": 0.0}, ValueError, "balance must be > 0"),
        ("a photo of {}", {"balance_target": "vae"}, ValueError, "balance acts in one of: text_encoder, unet; got 'vae'"),
        ("a photo of {}", {"height": 40}, ValueError, "multiple of 16"),
        ("a photo of {}", {"seeds": []}, ValueError, "at least one seed"),
        ("a photo of {} " + "very " * 80, {}, PromptError, "too long"),
    ],
)
def test_bad_input_is_refused_with_a_specific_message(concept, sampler, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        sampler(concept, prompt, **{**FAST, **kwargs})
    assert sampler.text_encoder_calls == 0


def test_concept_from_another_text_encoder_is_refused(backbone, sampler):
    other = IdentityMapper(torch.ones(64), num_tokens=2, num_anchors=4, hidden_dim=8, time_encoding_dim=16)
    concept = Concept(other, "face", (200, 900), "band_edge", {"token_dim": 64})
    with pytest.raises(ValueError, match="width 64.*reads width 32"):
        sampler(concept, "a photo of {}", **FAST)


# --------------------------------------------------------------------------- progress / interrupt
def test_callback_reports_progress_and_can_interrupt(concept, sampler):
    seen: list[tuple[int, int]] = []
    sampler(concept, "a photo of {}", callback_on_step_end=lambda i, n: seen.append((i, n)), **FAST)
    assert seen == [(1, 3), (2, 3), (3, 3)]

    calls: list[int] = []

    def stop_after_two(done: int, total: int) -> bool:
        calls.append(done)
        return done == 2

    with pytest.raises(GenerationInterrupted) as info:
        sampler(concept, "a photo of {}", callback_on_step_end=stop_after_two, **FAST)
    assert (info.value.step, info.value.total) == (2, 3) and calls == [1, 2]


def test_bf16_weights_generate_what_fp32_weights_do(backbone, tiny_cfg):
    """bf16 is what ``model.dtype: auto`` picks on GPUs and AMX CPUs. A concept made for the fp32
    backbone (fp32 mapper) drives the bf16 one through every injection path (identity tokens,
    balance, image bypass); the images differ from fp32 by rounding only, and the concept
    still changes them."""
    from studio.backbone import get_backbone

    bf16 = get_backbone(tiny_cfg.replace(**{"model.dtype": "bfloat16"}).model)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.fingerprint() == backbone.fingerprint()
    conv = bf16.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # NHWC in half precision
    assert backbone.unet.conv_in.weight.is_contiguous()  # fp32 stays NCHW
    concept = make_concept(backbone, bypass=True)
    request = dict(prompts=["a photo of {} in a hat"], seeds=[0, 1], balance=0.5, **FAST)
    full, half = Sampler(backbone), Sampler(bf16)
    exact, rounded = pixels(full(concept, **request)), pixels(half(concept, **request))
    plain = pixels(half(None, ["a photo of a face in a hat"], seeds=[0, 1], **FAST))
    rounding = np.mean([np.abs(a - b).mean() for a, b in zip(exact, rounded)])
    identity = np.mean([np.abs(a - b).mean() for a, b in zip(rounded, plain)])
    assert rounding < 1.0, rounding  # grey levels, of 255
    assert identity > rounding, (identity, rounding)
