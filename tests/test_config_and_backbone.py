"""Presets validate with messages that name the key; backbones load offline or fail fast and plainly."""
from __future__ import annotations

import time

import pytest
import torch

from studio.backbone import BackboneUnavailable, build_backbone, resolve_dtype, weights_available
from studio.config import ConfigError, ModelConfig, available_presets, load_preset


def test_every_shipped_preset_loads_and_the_authors_recipe_is_what_spec_says():
    assert {"tiny", "sd15", "sd15-fast", "dreamlike-photoreal"} <= set(available_presets())
    for name in available_presets():
        assert load_preset(name).name == name
    authors = load_preset("dreamlike-photoreal")
    assert authors.concept.num_tokens == 4
    assert authors.train.band == [400, 800] and authors.train.te_weight == 1e-3
    assert authors.train.lr == 1e-4 and authors.train.grad_accum == 2 and authors.train.steps == 1000
    assert authors.sample.guidance_scale == 8.0 and authors.sample.steps == 50
    assert authors.sample.scheduler == "dpmsolver++"
    assert authors.sample.negative_prompt.startswith("monochrome, lowres")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"train.stepz": 3}, ["train.stepz", "steps"]),  # typo: names the key and suggests the right one
        ({"train.steps": "many"}, ["train.steps"]),
        ({"train.band": [800, 400]}, ["train.band", "start"]),
        ({"sample.band": [100, 100]}, ["sample.band"]),
        ({"concept.super_category": "two words"}, ["super_category"]),
        ({"model.dtype": "float8"}, ["model.dtype", "float32"]),
        ({"train.resolution": 500}, ["train.resolution", "64"]),
        ({"sample.preview_prompts": ["no placeholder here"]}, ["preview_prompts", "{}"]),
    ],
)
def test_a_wrong_setting_fails_with_a_message_naming_it(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_preset("tiny", **overrides)
    for word in words:
        assert word in str(error.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_preset("no-such-preset")


def test_tiny_backbone_is_sd_shaped_frozen_and_offline(backbone):
    assert backbone.is_random and backbone.device.type == "cpu" and backbone.dtype == torch.float32
    assert backbone.tokenizer("a photo of a face").input_ids == [49406, 320, 1125, 539, 320, 1710, 49407]
    assert all(not p.requires_grad for p in backbone.unet.parameters())
    assert all(not p.requires_grad for p in backbone.text_encoder.parameters())
    assert backbone.text_encoder.config._attn_implementation == "studio"
    assert backbone.unet.config.cross_attention_dim == backbone.token_dim
    assert backbone.noise_scheduler.config.steps_offset == 1
    assert backbone.fingerprint()["token_dim"] == 32


def test_missing_hub_weights_fail_within_seconds_naming_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(source="nobody/no-such-model-here", image_encoder=None, device="cpu")
    started = time.monotonic()
    with pytest.raises(BackboneUnavailable) as error:
        build_backbone(cfg)
    assert time.monotonic() - started < 10
    assert "nobody/no-such-model-here" in str(error.value) and "hf download" in str(error.value)
    assert not weights_available(cfg)


def test_pickled_checkpoints_missing_files_and_bad_folders_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(BackboneUnavailable, match="safetensors"):
        build_backbone(ModelConfig(source=str(ckpt), image_encoder=None, device="cpu"))
    with pytest.raises(BackboneUnavailable, match="not found"):
        build_backbone(ModelConfig(source=str(tmp_path / "absent.safetensors"), image_encoder=None, device="cpu"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(BackboneUnavailable, match="text_encoder"):
        build_backbone(ModelConfig(source=str(tmp_path), image_encoder=None, device="cpu"))


def test_dtype_follows_the_device(monkeypatch):
    import studio.backbone

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 is emulated, slow
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16  # AMX runs bf16 natively
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not studio.backbone.cpu_has_bf16_matrix_units()  # an older torch without the probe
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_a_source_that_is_neither_a_folder_nor_a_hub_id_is_named_plainly(tmp_path):
    from studio.backbone import local_or_hub_folder

    assert local_or_hub_folder(str(tmp_path), None, [], "the CLIP image encoder") == str(tmp_path)
    for source in ("~/no-such-clip", "./missing", "a/b/c", str(tmp_path / "gone")):
        with pytest.raises(BackboneUnavailable, match=r"the CLIP image encoder .* is neither a folder here nor a hub id"):
            local_or_hub_folder(source, None, [], "the CLIP image encoder")
    with pytest.raises(BackboneUnavailable, match="the model source .* is neither a folder here"):
        build_backbone(ModelConfig(source="./nowhere", image_encoder=None, device="cpu"))


def test_face_settings_that_would_divide_by_zero_are_refused():
    from studio.config import ConfigError, load_preset

    with pytest.raises(ConfigError, match="face.same_person_threshold must be > 0"):
        load_preset("tiny", **{"face.same_person_threshold": 0})
    with pytest.raises(ConfigError, match="face.mask_feather >= 0"):
        load_preset("tiny", **{"face.mask_feather": -0.1})


def test_a_balance_that_acts_nowhere_the_studio_knows_is_refused():
    from studio.config import ConfigError, load_preset

    with pytest.raises(ConfigError, match="sample.balance_target must be one of text_encoder, unet, got 'vae'"):
        load_preset("tiny", **{"sample.balance_target": "vae"})
    assert load_preset("tiny", **{"sample.balance_target": "text_encoder"}).sample.balance_target == "text_encoder"
