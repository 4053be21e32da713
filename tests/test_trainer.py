"""The training loop on the tiny backbone: learning, determinism, pause/resume, rollback, events."""
from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from studio.conditioning import PromptError, encode_text, super_category_id, tokenize
from studio.events import PreviewReady, RolledBack, TrainingFailed, TrainingFinished, TrainingStep
from studio.losses import masked_mse
from studio.prompts import RECONSTRUCTION_TEMPLATES
from studio.trainer import Trainer, TrainingPhoto


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine two OpenMP
    threads spin against other processes (measured: 460 ms vs 60 ms per step under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(faces_dir) -> list[TrainingPhoto]:
    """A real photo (centre-cropped) and a synthetic one with a soft mask on its left half."""
    real = TrainingPhoto.center_crop(Image.open(faces_dir / "single" / "f2d_0.jpg"))
    pixels = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    mask = np.zeros((80, 80), np.float32)
    mask[:, :40] = 1.0
    return [real, TrainingPhoto(Image.fromarray(pixels), mask)]


def make_cfg(tiny_cfg, **overrides):
    """The tiny preset without previews, a few steps; overrides use dotted keys."""
    settings = {"train.preview_every": 0, "train.steps": 4, "train.snapshot_every": 2}
    settings.update(overrides)
    return tiny_cfg.replace(**settings)


def mapper_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.mapper.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def steps_of(events) -> list[TrainingStep]:
    return [e for e in events if isinstance(e, TrainingStep)]


# --------------------------------------------------------------------------- setup
def test_setup_computes_latents_masks_and_embedding_once(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg), photos)
    side = tiny_cfg.train.resolution // backbone.vae_scale_factor
    assert trainer.latents.shape == (2, 4, side, side)
    assert torch.equal(trainer.masks[0], torch.ones(1, side, side))  # no mask = whole image
    # Area downsampling of a left-half mask: left half 1, right half 0.
    assert torch.equal(trainer.masks[1, 0, :, : side // 2], torch.ones(side, side // 2))
    assert trainer.masks[1, 0, :, side // 2:].max() == 0
    assert trainer.image_embedding.shape == (backbone.image_embed_dim,)
    assert trainer.mapper.has_bypass and trainer.step == 0 and trainer.total == 4


def test_without_bypass_there_is_no_image_embedding(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"concept.use_bypass": False}), photos)
    assert trainer.image_embedding is None and not trainer.mapper.has_bypass
    assert trainer.concept().image_embedding is None


def test_no_photos_and_bad_super_category_fail_with_plain_messages(backbone, tiny_cfg, photos):
    with pytest.raises(ValueError, match="at least one photo"):
        Trainer(backbone, make_cfg(tiny_cfg), [])
    with pytest.raises(PromptError, match="not one"):
        Trainer(backbone, make_cfg(tiny_cfg, **{"concept.super_category": "qwertyuiopasdf"}), photos)


def test_training_photo_from_prepared_and_validation():
    crop = Image.new("RGB", (32, 32), "white")
    mask_image = Image.new("L", (32, 32), 255)
    photo = TrainingPhoto.from_prepared(SimpleNamespace(crop=crop, mask=mask_image))
    assert photo.mask.dtype == np.float32 and photo.mask.max() == 1.0
    assert TrainingPhoto.from_prepared(SimpleNamespace(crop=crop, mask=None)).mask is None
    assert TrainingPhoto.center_crop(Image.new("RGB", (40, 20))).image.size == (20, 20)
    with pytest.raises(ValueError, match="square"):
        TrainingPhoto(Image.new("RGB", (40, 20)))
    with pytest.raises(ValueError, match="empty"):
        TrainingPhoto(crop, np.zeros((32, 32), np.float32))


def test_a_jittered_view_cuts_the_mask_with_its_photo_and_stays_inside_it():
    """The pixels encode the mask, so a view whose mask were cut elsewhere than its image would
    show it; a zoom-in view never reaches outside the photo (no fill at its edges)."""
    import random

    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1.0  # off-centre, so a mirror image differs
    photo = TrainingPhoto(Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"), mask)
    rng = random.Random(0)
    views = [photo.jittered(rng, 0.3, flip=True) for _ in range(12)]
    for view in views:
        pixels = np.asarray(view.image.convert("L"), np.float32) / 255.0
        assert view.image.size == (64, 64) and view.mask.shape == (64, 64)
        assert np.abs(pixels - view.mask).mean() < 0.02
    # The views differ from each other and from the photo, and some are mirrored: the face's
    # centre of mass lands right of the photo's (x 23.5) only in a mirrored view.
    centres = [float((view.mask * np.arange(64)).sum() / view.mask.sum()) for view in views]
    assert len({round(c, 1) for c in centres}) > 6
    assert any(c > 32 for c in centres) and any(c < 32 for c in centres)
    # Without flip no view is mirrored; the largest crop at jitter 0.3 keeps 70 % of the side, so
    # the face's left edge (x 8) moves by at most 8 / 0.7.
    for _ in range(20):
        view = photo.jittered(rng, 0.3, flip=False)
        left = int(np.argmax(view.mask.max(axis=0) > 0.5))
        assert left <= 8 / 0.7 + 1


def test_views_train_on_jittered_crops_besides_each_photo(backbone, tiny_cfg, photos):
    plain = Trainer(backbone, make_cfg(tiny_cfg), photos)
    assert plain.latents.shape[0] == 2  # views are off by default
    cfg = make_cfg(tiny_cfg, **{"train.crop_jitter": 0.2, "train.views": 3})
    trainer = Trainer(backbone, cfg, photos)
    assert trainer.latents.shape[0] == 6 and trainer.masks.shape[0] == 6
    # Photo first, then its views; the photos themselves are encoded as without views.
    assert torch.equal(trainer.latents[0], plain.latents[0]) and torch.equal(trainer.latents[3], plain.latents[1])
    assert not torch.equal(trainer.latents[1], trainer.latents[0])
    again = Trainer(backbone, cfg, photos)
    assert torch.equal(again.latents, trainer.latents)  # the views come from train.seed
    steps = steps_of(trainer.run())
    assert len(steps) == 4 and all(np.isfinite(s.loss) for s in steps)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("train.views", 0, "train.views must be a whole number from 1"),
    ("train.crop_jitter", 0.8, r"train.crop_jitter must be in \[0, 0.5\]"),
])
def test_bad_view_settings_are_refused_with_their_names(tiny_cfg, key, value, match):
    from studio.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        tiny_cfg.replace(**{key: value})


# --------------------------------------------------------------------------- learning
class TextToImageDenoiser(nn.Module):
    """A denoiser that knows the image from the prompt: the tiny UNet plus an exact x0 readout.

    ε̂ = UNet(z_t, t, c) + (z_t − √ᾱ_t·x̂0(c)) / √(1 − ᾱ_t), x̂0(c) = a fixed random linear
    readout of the mean text state. The random tiny UNet alone barely listens to its text
    (its prediction moves by ~1e-4 MSE between two prompts), so no target could show learning
    with it; with the readout, the prompt decides the image as in a trained model, while the
    tiny UNet's output stays in as a noise-dependent nuisance. Same call shape as a UNet.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, token_dim: int, latent_shape, seed: int = 0):
        super().__init__()
        self.unet = unet
        self.dtype = unet.dtype  # what the trainer casts its noisy latents to
        self.latent_shape = tuple(latent_shape)
        generator = torch.Generator().manual_seed(seed)
        readout = torch.randn(token_dim, int(np.prod(latent_shape)), generator=generator) / token_dim**0.5
        self.register_buffer("readout", readout)
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())

    def image(self, text_states: torch.Tensor) -> torch.Tensor:
        """(B, L, D) text states (any dtype) -> (B, C, h, w) fp32 x̂0."""
        return (text_states.float().mean(dim=1) @ self.readout).view(-1, *self.latent_shape)

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        exact = (sample.float() - alpha.sqrt() * self.image(encoder_hidden_states)) / (1 - alpha).sqrt()
        nuisance = self.unet(
            sample.to(self.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            cross_attention_kwargs=cross_attention_kwargs,
        ).sample
        return SimpleNamespace(sample=exact + nuisance.float())


@pytest.fixture(scope="module")
def bf16_backbone(tiny_cfg):
    """The tiny backbone with bf16 weights: the dtype setup of GPUs and AMX CPUs (model.dtype auto)."""
    from studio.backbone import get_backbone

    return get_backbone(tiny_cfg.replace(**{"model.dtype": "bfloat16"}).model)


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_mapper_learns_a_hidden_identity(request, tiny_cfg, weights):
    """The target latent is what the model draws for 'a photo of {}' with hidden token vectors;
    training from the class word must close at least half of the held-out loss gap, with fp32
    weights and with bf16 ones (the fp32 mapper then learns through a bf16 text encoder and UNet)."""
    backbone = request.getfixturevalue("backbone" if weights == "float32" else "bf16_backbone")
    assert backbone.unet.dtype == getattr(torch, weights)
    side = tiny_cfg.train.resolution // backbone.vae_scale_factor
    denoiser = TextToImageDenoiser(backbone.unet, backbone.noise_scheduler.alphas_cumprod, backbone.token_dim, (4, side, side))
    teacher = dataclasses.replace(backbone, unet=denoiser)  # shares every frozen part
    k = tiny_cfg.concept.num_tokens
    slot = super_category_id(backbone.tokenizer, "face")
    class_word = backbone.text_encoder.get_input_embeddings().weight[slot].detach()
    directions = torch.randn(k, class_word.shape[0], generator=torch.Generator().manual_seed(1))
    hidden = class_word.norm() * nn.functional.normalize(directions, dim=-1)  # real-word scale
    ids, mask = tokenize(backbone.tokenizer, list(RECONSTRUCTION_TEMPLATES), k, slot)
    with torch.no_grad():
        # With an exact x0 readout every sampler ends at x̂0, so read it out directly.
        target = denoiser.image(encode_text(teacher, ids[:1], mask[:1], identity=hidden[None]).hidden)

    class TargetTrainer(Trainer):
        def _encode_latents(self, photos):
            return target.clone()

    # A zero head starts exactly at the class word, so the gap closed is measured from there.
    cfg = make_cfg(
        tiny_cfg, **{"train.steps": 30, "train.te_weight": 0.0, "concept.use_bypass": False, "concept.head_init": "zero"}
    )
    trainer = TargetTrainer(teacher, cfg, [TrainingPhoto(Image.new("RGB", (64, 64), "gray"))])

    # Held-out noise and timesteps, unlike any the trainer draws (its own seeded streams).
    held_out = torch.Generator().manual_seed(12345)
    n = 16
    timesteps = torch.randint(*cfg.train.band, (n,), generator=held_out)
    noise = torch.randn(n, *target.shape[1:], generator=held_out)
    rows = [i % len(RECONSTRUCTION_TEMPLATES) for i in range(n)]
    noisy = backbone.noise_scheduler.add_noise(target.expand(n, -1, -1, -1), noise, timesteps)

    @torch.no_grad()
    def held_out_loss(vectors: torch.Tensor) -> float:  # vectors (n, K, D)
        states = encode_text(teacher, ids[rows], mask[rows], identity=vectors).hidden
        return masked_mse(denoiser(noisy, timesteps, states).sample, noise, torch.ones(n, 1, 1, 1)).item()

    with torch.no_grad():
        untrained = held_out_loss(trainer.mapper(timesteps))
    class_loss = held_out_loss(class_word.expand(n, k, -1))
    hidden_loss = held_out_loss(hidden.expand(n, k, -1))
    assert untrained == pytest.approx(class_loss, rel=1e-5)  # an untrained mapper says "face"
    assert hidden_loss < 0.8 * class_loss  # the hidden identity explains the target clearly better

    events = list(trainer.run())
    assert isinstance(events[-1], TrainingFinished)
    with torch.no_grad():
        trained = held_out_loss(trainer.mapper(timesteps))
    assert class_loss - trained >= 0.5 * (class_loss - hidden_loss), (class_loss, hidden_loss, trained)


# --------------------------------------------------------------------------- determinism, pause/resume
def test_same_seed_gives_bit_identical_weights_and_other_seeds_differ(backbone, tiny_cfg, photos):
    cfg = make_cfg(tiny_cfg, **{"train.steps": 3})
    runs = []
    for seed in (7, 7, 8):
        trainer = Trainer(backbone, cfg.replace(**{"train.seed": seed}), photos)
        losses = [e.loss for e in steps_of(trainer.run())]
        runs.append((mapper_state(trainer), losses))
    assert_same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0]["head.weight"], runs[2][0]["head.weight"])
    assert runs[0][1] != runs[2][1]


@pytest.fixture(scope="module")
def uninterrupted(backbone, tiny_cfg, photos):
    """Six steps in one go (bypass on, so dropout draws are part of the random stream)."""
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 6}), photos)
    events = list(trainer.run())
    return mapper_state(trainer), [e.loss for e in steps_of(events)], trainer.optimizer.state_dict()


def test_pause_by_stopping_iteration_then_resume_equals_uninterrupted(backbone, tiny_cfg, photos, uninterrupted):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 6}), photos)
    losses = []
    for event in trainer.run():  # the engine pauses by simply not asking for more events
        losses.append(event.loss)
        if event.step == 2:
            break
    assert trainer.step == 2
    losses += [e.loss for e in steps_of(trainer.run(until=4))]
    assert trainer.step == 4
    events = list(trainer.run())
    losses += [e.loss for e in steps_of(events)]
    assert isinstance(events[-1], TrainingFinished)
    assert_same_weights(mapper_state(trainer), uninterrupted[0])
    assert losses == uninterrupted[1]


def test_state_dict_into_a_fresh_trainer_resumes_exactly(backbone, tiny_cfg, photos, uninterrupted):
    cfg = make_cfg(tiny_cfg, **{"train.steps": 6})
    first = Trainer(backbone, cfg, photos)
    head = [e.loss for e in steps_of(first.run(until=3))]
    state = first.state_dict()
    list(first.run())  # the source keeps training: the saved state must not move with it
    second = Trainer(backbone, cfg, photos)
    second.load_state_dict(state)
    assert second.step == 3
    tail = [e.loss for e in steps_of(second.run())]
    assert head + tail == uninterrupted[1]
    assert_same_weights(mapper_state(second), uninterrupted[0])
    optimizer_state = second.optimizer.state_dict()["state"]
    for index, slots in uninterrupted[2]["state"].items():
        assert torch.equal(optimizer_state[index]["exp_avg"], slots["exp_avg"])


# --------------------------------------------------------------------------- loop behaviour
def test_batch_and_accumulation_give_well_formed_events(backbone, tiny_cfg, photos):
    cfg = make_cfg(tiny_cfg, **{"train.batch_size": 2, "train.grad_accum": 2, "train.steps": 3})
    trainer = Trainer(backbone, cfg, photos)
    events = list(trainer.run())
    steps = steps_of(events)
    assert [e.step for e in steps] == [1, 2, 3]
    assert all(e.total == 3 and np.isfinite([e.loss, e.rec_loss, e.te_loss]).all() for e in steps)
    assert all(e.loss == pytest.approx(e.rec_loss + cfg.train.te_weight * e.te_loss, rel=1e-5) for e in steps)
    assert all(e.lr == cfg.train.lr and e.seconds > 0 for e in steps)
    assert 0.0 <= trainer.last_balance <= 1.0
    assert len(events) == 4 and isinstance(events[-1], TrainingFinished)
    assert events[-1].concept.steps_done == 3
    # Finished: another run() only repeats the result, without training further.
    again = list(trainer.run())
    assert len(again) == 1 and isinstance(again[0], TrainingFinished) and trainer.step == 3


def test_only_the_mapper_gets_gradients_and_the_backbone_is_unchanged(backbone, tiny_cfg, photos):
    frozen = {name: module for name, module in vars(backbone).items() if isinstance(module, nn.Module)}
    before = {f"{name}.{key}": value.clone() for name, module in frozen.items() for key, value in module.state_dict().items()}
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 2}), photos)
    start = mapper_state(trainer)
    seen = []

    def record(optimizer, args, kwargs):  # runs just before each optimiser update
        seen.append([p.grad is not None for p in trainer.mapper.parameters()])
        seen[-1] += [p.grad is None for module in frozen.values() for p in module.parameters()]

    trainer.optimizer.register_step_pre_hook(record)
    list(trainer.run())
    assert len(seen) == 2 and all(all(flags) for flags in seen)
    assert not torch.equal(start["head.weight"], trainer.mapper.state_dict()["head.weight"])
    after = {f"{name}.{key}": value for name, module in frozen.items() for key, value in module.state_dict().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_nan_loss_rolls_back_to_the_snapshot_and_training_goes_on(backbone, tiny_cfg, photos, monkeypatch):
    cfg = make_cfg(tiny_cfg, **{"train.steps": 7, "train.snapshot_every": 4})
    trainer = Trainer(backbone, cfg, photos)
    real_micro_step = trainer._micro_step
    calls = {"n": 0}

    def poisoned():  # the 6th micro-step (step 6) returns NaN once
        calls["n"] += 1
        result = real_micro_step()
        if calls["n"] == 6:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer, "_micro_step", poisoned)
    events, at_snapshot = [], None
    for event in trainer.run():
        events.append(event)
        if isinstance(event, TrainingStep) and event.step == 4:
            at_snapshot = mapper_state(trainer)
        if isinstance(event, RolledBack):
            assert (event.step, event.restored_step) == (6, 4)
            assert trainer.step == 4 and "finite" in event.reason
            assert_same_weights(mapper_state(trainer), at_snapshot)
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("RolledBack") == 1 and isinstance(events[-1], TrainingFinished)
    assert [e.step for e in steps_of(events)] == [1, 2, 3, 4, 5, 5, 6, 7]
    assert all(np.isfinite(list(trainer.mapper.state_dict().values())[0].numpy()))


def test_nan_gradient_with_a_finite_loss_also_rolls_back(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 3}), photos)
    list(trainer.run(until=2))  # step 2 is a snapshot (snapshot_every=2)
    start = mapper_state(trainer)
    poisoned = {"done": False}

    def nan_once(grad):
        if poisoned["done"]:
            return grad
        poisoned["done"] = True
        return grad * float("nan")

    trainer.mapper.body[0][0].weight.register_hook(nan_once)
    events = list(trainer.run())
    assert isinstance(events[0], RolledBack) and "gradients" in events[0].reason
    assert (events[0].step, events[0].restored_step) == (3, 2)
    assert [e.step for e in steps_of(events)] == [3] and isinstance(events[-1], TrainingFinished)
    assert not torch.equal(start["head.weight"], trainer.mapper.state_dict()["head.weight"])
    assert all(torch.isfinite(v).all() for v in trainer.mapper.state_dict().values())


def test_three_rollbacks_in_a_row_fail_with_advice(backbone, tiny_cfg, photos, monkeypatch):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 5}), photos)
    list(trainer.run(until=2))
    start = mapper_state(trainer)
    real_micro_step = trainer._micro_step

    def always_nan():
        result = real_micro_step()
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer, "_micro_step", always_nan)
    events = list(trainer.run())
    assert [type(e) for e in events] == [RolledBack] * 3 + [TrainingFailed]
    assert "learning rate" in events[-1].message
    assert trainer.step == 2
    assert_same_weights(mapper_state(trainer), start)


def test_out_of_memory_is_reported_and_the_trainer_stays_usable(backbone, tiny_cfg, photos, monkeypatch):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 3}), photos)
    real_micro_step = trainer._micro_step
    calls = {"n": 0}

    def oom_once():
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_micro_step()

    monkeypatch.setattr(trainer, "_micro_step", oom_once)
    events = list(trainer.run())
    assert [type(e) for e in events] == [TrainingStep, TrainingFailed]
    assert events[-1].kind == "oom" and "batch size" in events[-1].message
    assert trainer.step == 1 and all(p.grad is None for p in trainer.mapper.parameters())
    resumed = list(trainer.run())
    assert [e.step for e in steps_of(resumed)] == [2, 3] and isinstance(resumed[-1], TrainingFinished)


def test_other_errors_are_not_swallowed(backbone, tiny_cfg, photos, monkeypatch):
    trainer = Trainer(backbone, make_cfg(tiny_cfg), photos)
    monkeypatch.setattr(trainer, "_micro_step", lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(trainer.run())


# --------------------------------------------------------------------------- concept and previews
def test_concept_is_an_immutable_snapshot(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 2}), photos)
    before = trainer.concept()
    assert trainer.concept() is before  # unchanged weights: same snapshot, same uid
    list(trainer.run(until=1))
    after = trainer.concept()
    assert after.uid != before.uid and (before.steps_done, after.steps_done) == (0, 1)
    assert not torch.equal(before.mapper.head.weight, after.mapper.head.weight)
    list(trainer.run())
    assert not torch.equal(after.mapper.head.weight, trainer.concept().mapper.head.weight)  # old snapshot kept
    assert not after.mapper.training and not any(p.requires_grad for p in after.mapper.parameters())
    assert after.super_category == "face" and after.train_band == tuple(tiny_cfg.train.band)
    assert after.backbone == backbone.fingerprint() and torch.equal(after.image_embedding, trainer.image_embedding)


class RecordingSampler:
    """Stands in for studio.sampler.Sampler: records calls, returns one image per (prompt, seed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, concept, prompts, **kwargs):
        self.calls.append((concept, list(prompts), kwargs))
        images = [Image.new("RGB", (8, 8)) for _ in prompts for _ in kwargs["seeds"]]
        captions = [f"{p} (seed {s})" for p in prompts for s in kwargs["seeds"]]
        return SimpleNamespace(images=images, captions=captions)


def test_previews_at_start_every_n_steps_with_live_settings(backbone, tiny_cfg, photos):
    cfg = make_cfg(tiny_cfg, **{"train.steps": 4, "train.preview_every": 2, "sample.preview_seeds": [0, 1]})
    sampler = RecordingSampler()
    trainer = Trainer(backbone, cfg, photos, sampler=sampler)
    events = []
    for event in trainer.run():
        events.append(event)
        if isinstance(event, TrainingStep) and event.step == 1:
            trainer.preview_band, trainer.preview_balance = (300, 700), 0.5  # the UI's sliders
        if isinstance(event, TrainingStep) and event.step == 2:
            break  # pause before the step-2 preview: resuming must still show it
    events += list(trainer.run())
    previews = [e for e in events if isinstance(e, PreviewReady)]
    assert [p.step for p in previews] == [0, 2, 4]
    assert [(p.band, p.balance) for p in previews] == [((400, 800), 1.0), ((300, 700), 0.5), ((300, 700), 0.5)]
    assert len(previews[0].images) == len(cfg.sample.preview_prompts) * 2 == len(previews[0].captions)
    concept, prompts, kwargs = sampler.calls[1]
    assert concept.steps_done == 2 and prompts == cfg.sample.preview_prompts
    assert kwargs["num_inference_steps"] == cfg.sample.preview_steps and kwargs["band"] == (300, 700)
    assert kwargs["scheduler"] == cfg.sample.scheduler and kwargs["negative_prompt"] == cfg.sample.negative_prompt
    assert kwargs["height"] == kwargs["width"] == cfg.train.resolution  # sample.resolution 0 = training size
    assert isinstance(events[-1], TrainingFinished) and isinstance(events[-2], PreviewReady)
    with pytest.raises(Exception, match="band"):
        trainer.preview_band = (800, 400)


def test_previews_with_the_real_sampler_leave_training_unchanged(backbone, tiny_cfg, photos):
    """The default sampler is built lazily; previews draw from their own seeds, so training with
    and without them gives bit-identical weights."""
    settings = {"train.steps": 2, "sample.preview_steps": 2, "sample.preview_prompts": ["a photo of {}"]}
    with_previews = Trainer(backbone, make_cfg(tiny_cfg, **settings, **{"train.preview_every": 2}), photos)
    events = list(with_previews.run())
    previews = [e for e in events if isinstance(e, PreviewReady)]
    assert [p.step for p in previews] == [0, 2]
    assert all(len(p.images) == 1 and p.images[0].size == (64, 64) for p in previews)
    assert previews[0].captions[0].startswith("a photo of {}")
    without = Trainer(backbone, make_cfg(tiny_cfg, **settings), photos)
    list(without.run())
    assert_same_weights(mapper_state(with_previews), mapper_state(without))


def test_state_survives_a_safetensors_checkpoint(backbone, tiny_cfg, photos, uninterrupted):
    """The trainer state holds only what studio.concept's pickle-free checkpoints can store."""
    from studio.concept_file import checkpoint_to_bytes, load_checkpoint

    cfg = make_cfg(tiny_cfg, **{"train.steps": 6})
    first = Trainer(backbone, cfg, photos)
    head = [e.loss for e in steps_of(first.run(until=3))]
    second = Trainer(backbone, cfg, photos)
    second.load_state_dict(load_checkpoint(checkpoint_to_bytes(first.state_dict())))
    tail = [e.loss for e in steps_of(second.run())]
    assert head + tail == uninterrupted[1]
    assert_same_weights(mapper_state(second), uninterrupted[0])


def test_a_state_resumes_only_the_run_it_came_from(backbone, tiny_cfg, photos):
    """Other photos, a changed mask or other maths are refused by name; more steps are fine."""
    from studio.trainer import StateMismatch

    cfg = make_cfg(tiny_cfg, **{"train.steps": 2})
    first = Trainer(backbone, cfg, photos)
    list(first.run(until=1))
    state = first.state_dict()

    longer = Trainer(backbone, cfg.replace(**{"train.steps": 9, "train.preview_every": 3}), photos)
    longer.load_state_dict(state)
    assert longer.step == 1 and longer.total == 9

    with pytest.raises(StateMismatch, match="other photos") as other_photos:
        Trainer(backbone, cfg, photos[:1]).load_state_dict(state)
    assert "1 photo(s)" in str(other_photos.value) and "2 photo(s)" in str(other_photos.value)
    moved_mask = TrainingPhoto(photos[1].image, np.roll(photos[1].mask, 1, axis=1))
    with pytest.raises(StateMismatch, match="other photos"):
        Trainer(backbone, cfg, [photos[0], moved_mask]).load_state_dict(state)
    with pytest.raises(StateMismatch, match=r"other settings.*train\.lr was 0\.003, now 0\.5"):
        Trainer(backbone, cfg.replace(**{"train.lr": 0.5}), photos).load_state_dict(state)
    with pytest.raises(StateMismatch, match=r"concept\.num_tokens was 4, now 2"):
        Trainer(backbone, cfg.replace(**{"concept.num_tokens": 2}), photos).load_state_dict(state)

    # A state saved before a setting existed resumes while that setting is at its default.
    older = {**state, "run": {k: v for k, v in state["run"].items() if not k.startswith(("train.views", "train.crop"))}}
    Trainer(backbone, cfg, photos).load_state_dict(older)
    with pytest.raises(StateMismatch, match=r"train\.crop_jitter was 0\.0, now 0\.1"):
        Trainer(backbone, cfg.replace(**{"train.crop_jitter": 0.1}), photos).load_state_dict(older)


def test_a_preset_can_give_its_own_training_prompts(backbone, tiny_cfg, photos):
    """train.reconstruction_prompts / train.tandem_prompts replace the built-in lists (the toy
    world trains in its own words); empty lists keep the built-in ones."""
    reconstruction, tandem = ["a portrait of {}", "a headshot of {}"], ["{} on a beach"]
    cfg = make_cfg(tiny_cfg, **{"train.reconstruction_prompts": reconstruction, "train.tandem_prompts": tandem})
    trainer = Trainer(backbone, cfg, photos[:1])
    tokenizer = backbone.tokenizer
    decoded = {tokenizer.decode(row, skip_special_tokens=True) for row in trainer.class_ids.tolist()}
    word = cfg.concept.super_category
    assert decoded == {f"a portrait of {word}", f"a headshot of {word}"}
    assert len(trainer.te_ids) == 1 and "beach" in tokenizer.decode(trainer.te_ids[0], skip_special_tokens=True)
    steps = steps_of(trainer.run())
    assert len(steps) == cfg.train.steps and all(np.isfinite(s.loss) for s in steps)
    assert len(Trainer(backbone, make_cfg(tiny_cfg), photos[:1]).rec_ids) == len(RECONSTRUCTION_TEMPLATES)


@pytest.mark.parametrize("prompts, match", [
    (["a portrait of someone"], "exactly one {} where the person goes"),
    (["{} and {}"], "exactly one {}"),
    (["{} " + "x" * 300], "at most 200 characters"),
    (["{}"] * 65, "at most 64 prompts, got 65"),
])
def test_training_prompts_without_one_placeholder_are_refused(tiny_cfg, prompts, match):
    from studio.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(match)):
        tiny_cfg.replace(**{"train.tandem_prompts": prompts})
