"""The released recipe's wiring and every ablation switch: bypass input, head init, stage
regulation, the textual-inversion baseline, class-guided denoising regularization, no clipping,
and the prediction types training accepts."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from studio.backbone import BackboneUnavailable
from studio.concept_file import concept_to_bytes, load_concept, read_concept_info
from studio.conditioning import super_category_id, tokenize
from studio.config import ConceptConfig, TrainConfig
from studio.events import TrainingStep
from studio.mapper import IdentityMapper, StaticTokenMapper
from studio.prompts import RECONSTRUCTION_TEMPLATES
from studio.sampler import Sampler
from studio.trainer import Trainer, TrainingPhoto
from test_concept import _rewrite_metadata

FAST = dict(num_inference_steps=4, guidance_scale=1.0, scheduler="ddim", height=64, width=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[TrainingPhoto]:
    """Two synthetic photos with soft masks on the left and the right half."""
    rng = np.random.default_rng(0)
    out = []
    for half in (slice(0, 32), slice(32, 64)):
        mask = np.zeros((64, 64), np.float32)
        mask[:, half] = 1.0
        out.append(TrainingPhoto(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), mask))
    return out


def make_cfg(tiny_cfg, **overrides):
    settings = {"train.preview_every": 0, "train.steps": 2, "train.snapshot_every": 2}
    settings.update(overrides)
    return tiny_cfg.replace(**settings)


def word(backbone) -> torch.Tensor:
    return backbone.text_encoder.get_input_embeddings().weight[super_category_id(backbone.tokenizer, "face")].detach()


def small_mapper(backbone, **kwargs) -> IdentityMapper:
    return IdentityMapper(word(backbone), 2, (200, 900), 8, 16, 32, backbone.image_embed_dim, **kwargs)


# --------------------------------------------------------------------------- defaults = the released recipe
def test_defaults_are_the_released_recipe():
    concept, train = ConceptConfig(), TrainConfig()
    assert (concept.method, concept.bypass_input, concept.head_init, concept.stage_regulation) == (
        "personamagic", "trunk", "default", True,
    )
    assert train.max_grad_norm == 0 and train.cgdr_weight == 0


def test_the_trunk_bypass_trains_the_trunk_and_the_encoding_bypass_does_not(backbone):
    embedding = torch.randn(backbone.image_embed_dim)
    for wiring, reaches_trunk in (("trunk", True), ("encoding", False)):
        mapper = small_mapper(backbone, bypass_input=wiring)
        mapper.bypass_vectors(torch.tensor([300, 700]), embedding).pow(2).sum().backward()
        trunk_grads = [p.grad for p in [*mapper.anchors.parameters(), *mapper.body.parameters()]]
        assert all(g is not None and g.abs().sum() > 0 for g in trunk_grads) == reaches_trunk, wiring
        assert all(g is None for g in trunk_grads) != reaches_trunk, wiring
    trunk = small_mapper(backbone, bypass_input="trunk")
    assert trunk.bypass[0][0].in_features == 16 + backbone.image_embed_dim  # hidden width + image embedding


def test_head_init_default_starts_off_the_word_and_zero_starts_on_it(backbone):
    t = torch.tensor([300, 700])
    default = small_mapper(backbone)(t)
    zero = small_mapper(backbone, head_init="zero")
    assert not torch.allclose(default, word(backbone).expand_as(default), atol=1e-3)
    assert torch.allclose(default.norm(dim=-1), word(backbone).norm().expand(2, 2), atol=1e-4)
    assert torch.allclose(zero(t), word(backbone).expand_as(default), atol=1e-6)
    assert torch.count_nonzero(zero.bypass[-1].weight) == 0
    assert torch.count_nonzero(small_mapper(backbone).bypass[-1].weight) > 0


def test_trainer_follows_the_wiring_and_head_switches(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"concept.bypass_input": "encoding", "concept.head_init": "zero"}), photos)
    assert trainer.mapper.bypass_input == "encoding" and torch.count_nonzero(trainer.mapper.head.weight) == 0
    assert Trainer(backbone, make_cfg(tiny_cfg), photos).mapper.bypass_input == "trunk"


def test_concept_files_record_the_wiring_and_old_files_load_as_the_encoding_branch(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg, **{"concept.bypass_input": "encoding"}), photos)
    list(trainer.run())
    concept = trainer.concept()
    data = concept_to_bytes(concept)
    info = read_concept_info(data)
    assert (info["bypass_input"], info["method"], info["stage_regulation"]) == ("encoding", "personamagic", True)
    assert info["config"]["concept"]["head_init"] == "default"
    old = _rewrite_metadata(data, lambda meta: [meta.pop(k) for k in ("bypass_input", "method", "stage_regulation")])
    loaded = load_concept(old, backbone)
    assert loaded.mapper.bypass_input == "encoding" and loaded.stage_regulation
    t = torch.tensor([400, 600])
    assert torch.equal(
        loaded.mapper.bypass_vectors(t, loaded.image_embedding), concept.mapper.bypass_vectors(t, concept.image_embedding)
    )


# --------------------------------------------------------------------------- gradient clipping
def test_gradients_are_not_clipped_by_default(backbone, tiny_cfg, photos, monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        seen.append(max_norm)
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    list(Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 1}), photos).run())
    list(Trainer(backbone, make_cfg(tiny_cfg, **{"train.steps": 1, "train.max_grad_norm": 0.5}), photos).run())
    assert seen == [float("inf"), 0.5]


# --------------------------------------------------------------------------- prediction types
def test_a_sample_predicting_scheduler_is_refused_with_a_sentence(backbone, tiny_cfg, photos):
    scheduler = DDPMScheduler.from_config(backbone.noise_scheduler.config, prediction_type="sample")
    with pytest.raises(BackboneUnavailable, match="predicts 'sample'.*'epsilon'.*'v_prediction'"):
        Trainer(dataclasses.replace(backbone, noise_scheduler=scheduler), make_cfg(tiny_cfg), photos)
    velocity = DDPMScheduler.from_config(backbone.noise_scheduler.config, prediction_type="v_prediction")
    Trainer(dataclasses.replace(backbone, noise_scheduler=velocity), make_cfg(tiny_cfg), photos)


# --------------------------------------------------------------------------- stage regulation off
def test_without_stage_regulation_training_covers_all_timesteps_and_generation_every_step(backbone, tiny_cfg, photos, monkeypatch):
    cfg = make_cfg(tiny_cfg, **{"concept.stage_regulation": False})
    trainer = Trainer(backbone, cfg, photos)
    drawn = []
    original = torch.randint

    def recording(low, high, *args, **kwargs):
        drawn.append((low, high))
        return original(low, high, *args, **kwargs)

    monkeypatch.setattr(torch, "randint", recording)
    list(trainer.run())
    monkeypatch.undo()
    assert trainer.band == (0, 1000) and set(drawn) == {(0, 1000)}
    concept = load_concept(concept_to_bytes(trainer.concept()), backbone)
    assert not concept.stage_regulation and concept.train_band == (0, 1000)
    # DDIM's 4 steps are t = 751, 501, 251, 1: above the band (200, 600) a regulated concept says the word.
    result = Sampler(backbone)(concept, "a photo of {}", band=(200, 600), **FAST)
    assert result.settings[0]["identity_steps"] == result.settings[0]["total_steps"] == 4
    regulated = Trainer(backbone, make_cfg(tiny_cfg), photos).concept()
    staged = Sampler(backbone)(regulated, "a photo of {}", band=(200, 600), **FAST)
    assert staged.settings[0]["identity_steps"] < 4


# --------------------------------------------------------------------------- textual-inversion baseline
def test_ti_is_one_static_token_with_plain_mse_and_no_tandem_term(backbone, tiny_cfg, photos):
    cfg = make_cfg(tiny_cfg, **{"concept.method": "ti", "train.te_weight": 1.0, "train.steps": 3})
    trainer = Trainer(backbone, cfg, photos)
    mapper = trainer.mapper
    assert isinstance(mapper, StaticTokenMapper) and mapper.num_tokens == 1 and not trainer.use_bypass
    assert torch.equal(mapper(torch.tensor([0, 999]))[0], mapper(torch.tensor([0, 999]))[1])
    assert torch.equal(mapper.tokens[0], word(backbone).float())  # starts as the word
    assert torch.equal(trainer.rec_weights, torch.ones_like(trainer.masks))  # no mask
    assert trainer.band == (0, 1000)
    steps = [e for e in trainer.run() if isinstance(e, TrainingStep)]
    assert all(s.loss == pytest.approx(s.rec_loss) and s.te_loss > 0 for s in steps)  # TE logged, not trained
    assert not torch.equal(trainer.mapper.tokens[0], word(backbone).float())
    concept = load_concept(concept_to_bytes(trainer.concept()), backbone)
    assert concept.method == "ti" and concept.num_tokens == 1 and not concept.stage_regulation
    assert torch.equal(concept.mapper.tokens, trainer.mapper.tokens)
    result = Sampler(backbone)(concept, "a photo of {}", band=(200, 600), **FAST)
    assert result.settings[0]["identity_steps"] == 4


# --------------------------------------------------------------------------- class-guided denoising regularization
def test_cgdr_class_prompts_put_the_word_where_the_identity_was(backbone, tiny_cfg, photos):
    trainer = Trainer(backbone, make_cfg(tiny_cfg), photos)
    slot = super_category_id(backbone.tokenizer, "face")
    expected = tokenize(backbone.tokenizer, list(RECONSTRUCTION_TEMPLATES), 0, slot)[0]
    assert torch.equal(trainer.class_ids.cpu(), expected)
    assert (trainer.class_ids == slot).sum(dim=1).eq(1).all()


def test_cgdr_is_its_own_logged_term_outside_the_mask(backbone, tiny_cfg, photos, monkeypatch):
    off = [e for e in Trainer(backbone, make_cfg(tiny_cfg), photos).run() if isinstance(e, TrainingStep)]
    assert all(s.cgdr_loss == 0 for s in off)
    cfg = make_cfg(tiny_cfg, **{"train.cgdr_weight": 0.5})
    trainer = Trainer(backbone, cfg, photos)
    calls = []
    original = trainer._class_prediction

    def counting(*args):
        out = original(*args)
        calls.append(out.requires_grad)
        return out

    monkeypatch.setattr(trainer, "_class_prediction", counting)
    on = [e for e in trainer.run() if isinstance(e, TrainingStep)]
    assert calls == [False] * 2  # one no-grad pass per micro-step
    te = cfg.train.te_weight
    for step in on:
        assert step.cgdr_loss > 0
        assert step.loss == pytest.approx(step.rec_loss + te * step.te_loss + 0.5 * step.cgdr_loss, rel=1e-5)


def test_cgdr_weighs_only_the_background(backbone, tiny_cfg):
    """With the mask covering the whole image there is no background: the term is zero."""
    full = [TrainingPhoto(Image.new("RGB", (64, 64), "gray"), np.ones((64, 64), np.float32))]
    steps = [e for e in Trainer(backbone, make_cfg(tiny_cfg, **{"train.cgdr_weight": 1.0}), full).run()
             if isinstance(e, TrainingStep)]
    assert all(s.cgdr_loss == 0 for s in steps)


# --------------------------------------------------------------------------- prompts
def test_reconstruction_prompts_are_the_textual_inversion_templates_and_tandem_prompts_are_apart():
    from studio.prompts import TANDEM_PROMPTS

    assert len(RECONSTRUCTION_TEMPLATES) == 27 == len(set(RECONSTRUCTION_TEMPLATES))
    assert RECONSTRUCTION_TEMPLATES[0] == "a photo of a {}"
    assert {"a photo of a dirty {}", "a photo of the weird {}", "a rendition of the {}"} <= set(RECONSTRUCTION_TEMPLATES)
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in RECONSTRUCTION_TEMPLATES)
    assert not set(RECONSTRUCTION_TEMPLATES) & set(TANDEM_PROMPTS)
    assert all(p.count("{}") == 1 for p in TANDEM_PROMPTS)
