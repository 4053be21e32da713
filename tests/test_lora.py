"""Style LoRAs: read through diffusers' loader, applied per call, never left on the shared backbone."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.lora import LoraFileError, LoraUse, applied, load_lora, parse_lora_argument
from studio.sampler import Sampler

FAST = dict(num_inference_steps=3, guidance_scale=4.0, seeds=5)


def kohya_lora(backbone, *, seed: int = 0, unet: bool = True, text: bool = True, cross_width: int | None = None) -> dict:
    """A random LoRA in the kohya/A1111 layout (lora_unet_* / lora_te_*, lora_down/lora_up, alpha)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def pair(key: str, module: torch.nn.Linear, in_features: int | None = None) -> None:
        rank = 4
        state[f"{key}.lora_down.weight"] = torch.randn(rank, in_features or module.in_features, generator=generator)
        state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5
        # alpha != rank, and another alpha for the text encoder (diffusers' peft path keeps one alpha per part)
        state[f"{key}.alpha"] = torch.tensor(2.0 if key.startswith("lora_unet_") else 3.0)

    if unet:
        for name, module in backbone.unet.named_modules():
            if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0")):
                width = cross_width if cross_width and name.endswith("attn2.to_k") else None
                pair("lora_unet_" + name.replace(".", "_"), module, width)
    if text:
        for name, module in backbone.text_encoder.named_modules():
            if name.endswith(("self_attn.q_proj", "mlp.fc1")):
                pair("lora_te_" + name.replace(".", "_"), module)  # kohya: lora_te_text_model_encoder_...
    return state


def save(state: dict, path) -> str:
    save_file(state, str(path))
    return str(path)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


@pytest.fixture(scope="module")
def style(backbone, tmp_path_factory):
    return load_lora(save(kohya_lora(backbone), tmp_path_factory.mktemp("lora") / "style.safetensors"), backbone)


def test_a_random_lora_changes_the_images_and_strength_zero_is_bit_for_bit_none(backbone, style):
    sampler = Sampler(backbone)
    plain = pixels(sampler(None, "a photo of {} in a garden", **FAST))
    with applied(backbone, [LoraUse(style, 1.0)]):
        styled = sampler(None, "a photo of {} in a garden", **FAST)
    with applied(backbone, [LoraUse(style, 0.0)]):
        off = pixels(sampler(None, "a photo of {} in a garden", **FAST))
    assert np.abs(pixels(styled) - plain).mean() > 1.0
    assert np.array_equal(off, plain)
    assert np.array_equal(pixels(sampler(None, "a photo of {} in a garden", **FAST)), plain)  # nothing left behind
    assert styled.settings[0]["loras"] == [{"name": "style.safetensors", "sha256": style.sha256, "strength": 1.0}]


def test_a_text_encoder_lora_is_not_served_from_the_text_condition_cache(backbone, tmp_path):
    text_only = load_lora(save(kohya_lora(backbone, seed=2, unet=False), tmp_path / "te.safetensors"), backbone)
    assert {layer.part for layer in text_only.layers} == {"text_encoder"}
    sampler = Sampler(backbone)
    plain = pixels(sampler(None, "a photo of {}", **FAST))
    with applied(backbone, [LoraUse(text_only, 1.0)]):
        styled = pixels(sampler(None, "a photo of {}", **FAST))
    assert np.abs(styled - plain).mean() > 0.5


def test_per_call_application_matches_diffusers_own_lora_loading(backbone, tmp_path):
    """The same file through StableDiffusionPipeline.load_lora_weights (peft) on copies of the parts."""
    from diffusers import StableDiffusionPipeline

    path = save(kohya_lora(backbone, seed=4), tmp_path / "ref.safetensors")
    weights = load_lora(path, backbone)
    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=copy.deepcopy(backbone.text_encoder), tokenizer=backbone.tokenizer,
        unet=copy.deepcopy(backbone.unet), scheduler=backbone.noise_scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(path, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    generator = torch.Generator().manual_seed(0)
    channels, size = backbone.unet.config.in_channels, backbone.unet.config.sample_size
    latents = torch.randn(2, channels, size, size, generator=generator)
    ids = backbone.tokenizer(["a photo of a face", "a red car"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        reference_text = pipe.text_encoder(ids).last_hidden_state
        reference = pipe.unet(latents, 500, encoder_hidden_states=reference_text).sample
        with applied(backbone, [LoraUse(weights, 0.7)]):
            ours_text = backbone.text_encoder(ids).last_hidden_state
            ours = backbone.unet(latents, 500, encoder_hidden_states=ours_text).sample
        plain_text = backbone.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours_text, reference_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert (plain_text - ours_text).abs().max() > 1e-3


def test_a_session_lora_is_invisible_to_another_session_running_at_the_same_time(backbone, style):
    """Thread A holds its LoRA active while thread B runs the shared UNet: B sees the plain weights."""
    generator = torch.Generator().manual_seed(1)
    channels, size = backbone.unet.config.in_channels, backbone.unet.config.sample_size
    latents = torch.randn(1, channels, size, size, generator=generator)
    text = torch.randn(1, 77, backbone.token_dim, generator=generator)

    def unet() -> torch.Tensor:
        with torch.no_grad():
            return backbone.unet(latents, 400, encoder_hidden_states=text).sample

    baseline = unet()
    a_active, b_done = threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}

    def session_a() -> None:
        with applied(backbone, [LoraUse(style, 1.0)]):
            a_active.set()
            assert b_done.wait(60)
            results["a"] = unet()

    def session_b() -> None:
        assert a_active.wait(60)
        results["b"] = unet()
        b_done.set()

    threads = [threading.Thread(target=session_a), threading.Thread(target=session_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert torch.equal(results["b"], baseline)
    assert (results["a"] - baseline).abs().max() > 1e-3
    assert torch.equal(unet(), baseline)


# --------------------------------------------------------------------------- refusals
def test_a_lora_for_another_base_is_refused_with_a_sentence(backbone, tmp_path):
    wide = save(kohya_lora(backbone, text=False, cross_width=2048), tmp_path / "sdxl_style.safetensors")
    with pytest.raises(LoraFileError, match="made for another base model.*2048"):
        load_lora(wide, backbone)
    foreign = kohya_lora(backbone, unet=False, text=False)
    foreign["lora_te2_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(4, 1280)
    foreign["lora_te2_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(1280, 4)
    foreign["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.randn(4, 32)
    foreign["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.randn(32, 4)
    with pytest.raises(LoraFileError, match="another base model"):
        load_lora(save(foreign, tmp_path / "xl.safetensors"), backbone)


def test_pickles_other_files_and_embeddings_are_refused_with_sentences(backbone, tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "pickled.safetensors")
    with pytest.raises(LoraFileError, match="not a LoRA.*(pickle|zip).*safetensors"):
        load_lora(tmp_path / "pickled.safetensors", backbone)
    (tmp_path / "style.ckpt").write_bytes(b"\x80\x04junk")
    with pytest.raises(LoraFileError, match="not a .safetensors file"):
        load_lora(tmp_path / "style.ckpt", backbone)
    (tmp_path / "notes.safetensors").write_text("hello, this is text")
    with pytest.raises(LoraFileError, match="not a LoRA: it looks like a text file"):
        load_lora(tmp_path / "notes.safetensors", backbone)
    save({"emb_params": torch.zeros(2, backbone.token_dim)}, tmp_path / "alice.safetensors")
    with pytest.raises(LoraFileError, match="textual-inversion"):
        load_lora(tmp_path / "alice.safetensors", backbone)
    save({"weight": torch.zeros(3, 3)}, tmp_path / "random.safetensors")
    with pytest.raises(LoraFileError, match="(not a LoRA|another base)"):
        load_lora(tmp_path / "random.safetensors", backbone)


def test_the_diffusers_layout_loads_as_well(backbone, tmp_path):
    state = {}
    for name, module in backbone.unet.named_modules():
        if name.endswith("attn2.to_v"):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features)
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2)
    weights = load_lora(save(state, tmp_path / "diffusers_style.safetensors"), backbone)
    assert len(weights.layers) == len(state) // 2 and all(layer.scale == 1.0 for layer in weights.layers)


def test_lora_arguments_take_an_optional_strength():
    assert parse_lora_argument("styles/ink.safetensors:0.6") == ("styles/ink.safetensors", 0.6)
    assert parse_lora_argument("styles/ink.safetensors") == ("styles/ink.safetensors", 1.0)
    with pytest.raises(LoraFileError, match="strength"):
        parse_lora_argument("ink.safetensors:7")


def test_generate_takes_lora_arguments_and_records_them_in_the_png(backbone, tmp_path, capsys):
    import json

    from PIL import Image

    from studio.cli import main

    path = save(kohya_lora(backbone, seed=6), tmp_path / "ink.safetensors")
    out = tmp_path / "styled.png"
    code = main(["generate", "--preset", "tiny", "--prompt", "a photo of {}", "--out", str(out), "--steps", "2",
                 "--lora", f"{path}:0.5"])
    assert code == 0
    settings = json.loads(Image.open(out).text["personamagic"])
    assert settings["loras"][0]["name"] == "ink.safetensors" and settings["loras"][0]["strength"] == 0.5
    (tmp_path / "ink.ckpt").write_bytes(b"\x80\x04junk")
    code = main(["generate", "--preset", "tiny", "--prompt", "a photo of {}", "--out", str(out), "--steps", "2",
                 "--lora", str(tmp_path / "ink.ckpt")])
    assert code == 2 and "not a .safetensors file" in capsys.readouterr().err
