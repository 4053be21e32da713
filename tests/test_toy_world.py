"""The toy world's renderer, captions and prompt parser (no weights needed)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.toy.world import (
    ATTRIBUTES,
    DEFAULT_SCENE_VALUES,
    Identity,
    Scene,
    ToyPromptError,
    caption,
    parse_prompt,
    random_scene,
    render,
    render_prompt,
)

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_rendering_is_deterministic_and_identities_differ_by_features():
    scene = Scene(setting="forest", headwear="crown", style="photo")
    a1, a2 = np.asarray(render(100_000, scene, seed=3)), np.asarray(render(100_000, scene, seed=3))
    assert a1.shape == (64, 64, 3) and np.array_equal(a1, a2)
    people = [Identity.from_number(n) for n in range(100_000, 100_040)]
    # not one colour: shapes and proportions vary between identities too
    for name in ("face_width", "face_aspect", "eye_spacing", "eye_size", "nose_length", "mouth_width"):
        values = [getattr(p, name) for p in people]
        assert np.std(values) > 0.01 * np.mean(values), name
    assert len({p.hair_style for p in people}) >= 4 and len({p.mark for p in people}) == 3
    b = np.asarray(render(100_001, scene, seed=3))
    assert np.abs(a1.astype(int) - b).mean() > 3


def test_each_attribute_changes_the_picture():
    base = Scene()
    reference = np.asarray(render(100_002, base)).astype(int)
    for attribute, values in ATTRIBUTES.items():
        for value in values:
            if value == getattr(base, attribute):
                continue
            changed = np.asarray(render(100_002, replace(base, **{attribute: value}))).astype(int)
            # expressions change only the mouth and eyes: count the pixels that clearly differ
            assert (np.abs(changed - reference).max(axis=2) > 40).sum() >= 8, (attribute, value)


def test_landmarks_follow_the_framing_jitter():
    scene = Scene()
    _, centred = render(100_003, scene, with_landmarks=True)
    moved_scene = replace(scene, dx=0.1, dy=-0.05, rotation=10.0)
    _, moved = render(100_003, moved_scene, with_landmarks=True)
    shift = np.array(moved.face_center) - np.array(centred.face_center)
    assert shift == pytest.approx([6.4, -3.2], abs=0.6)
    eyes = np.array(moved.right_eye) - np.array(moved.left_eye)
    # the eye line turns with the head (counter-clockwise on screen = up to the right)
    assert np.degrees(np.arctan2(-eyes[1], eyes[0])) == pytest.approx(10.0, abs=0.5)


def test_every_caption_parses_back_to_its_scene():
    rng = np.random.default_rng(0)
    for number in range(200):
        scene = random_scene(rng)
        text = caption(Identity.from_number(number), scene, rng)
        asked = parse_prompt(text, allow_traits=True)
        for attribute, value in asked.items():
            assert getattr(scene, attribute) == value, (text, attribute)


def test_prompt_parser_reads_scenes_and_refuses_unknown_words():
    assert parse_prompt("a photo of {} wearing sunglasses in a forest") == {
        "style": "photo", "eyewear": "sunglasses", "setting": "forest"}
    assert parse_prompt("an oil painting of {} with a red hat, smiling, on the beach") == {
        "style": "oil painting", "headwear": "red hat", "expression": "smiling", "setting": "beach"}
    with pytest.raises(ToyPromptError, match="'riding', 'dragon'"):
        parse_prompt("a photo of {} riding a dragon")
    with pytest.raises(ToyPromptError, match="two settings"):
        parse_prompt("{} on a beach in a forest")
    with pytest.raises(ToyPromptError, match="identity decides"):
        parse_prompt("a photo of {} with red hair")


def test_ground_truth_uses_defaults_for_what_the_prompt_leaves_out():
    plain = np.asarray(render_prompt(100_004, "a photo of {}", seed=0))
    explicit = np.asarray(render(100_004, replace(Scene(**DEFAULT_SCENE_VALUES)), seed=0))
    assert plain.shape == explicit.shape
    # same scene, only the framing jitter of the seed differs: close in colour statistics
    assert np.abs(plain.mean(axis=(0, 1)) - explicit.mean(axis=(0, 1))).max() < 12


def test_render_command_writes_the_ground_truth_and_refuses_unknown_words(tmp_path):
    out = tmp_path / "x.png"
    cmd = [sys.executable, "-m", "studio", "toy", "render", "--identity", "100005", "--seed", "2",
           "--prompt", "a photo of {} wearing sunglasses in a forest", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(out)),
                          np.asarray(render_prompt(100_005, "a photo of {} wearing sunglasses in a forest", seed=2)))
    bad = subprocess.run(cmd[:-4] + ["--prompt", "a photo of {} on the moon", "--out", str(tmp_path / "y.png")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not know 'moon'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "y.png").exists()


@pytest.mark.parametrize(
    ("flags", "sentence"),
    [
        (["--device", "gpu0"], "--device must be a torch device such as cpu or cuda, got 'gpu0'"),
        (["--batch", "0"], "--batch must be between 1 and 4096, got 0"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--identity-tokens", "1.5"], "--identity-tokens is a share from 0 to 1, got 1.5"),
        (["--min-snr", "0"], "--min-snr is a positive signal-to-noise cap such as 5, got 0.0"),
        (["--instrument-steps", "0"], "--instrument-steps must be between 1 and 1000000, got 0"),
        (["--decoder-rounds", "0"], "--decoder-rounds must be between 1 and 100, got 0"),
        (["--feature-weight", "101"], "--feature-weight must be between 0 and 100, got 101.0"),
        (["--decoder-feature-weight", "-1"], "--decoder-feature-weight must be between 0 and 100, got -1.0"),
        (["--decoder-latent-noise", "2"], "--decoder-latent-noise must be between 0 and 1, got 2.0"),
        (["--anneal"], "--anneal decays the learning rate towards --steps: give --steps too"),
        (["--head-width", "48"], "--head-width must divide the UNet's attention channels 64, 128, got 48"),
        (["--head-width", "64", "--fine-attention"], "--head-width must divide the UNet's attention channels 32, 64, 128, got 64"),
        (["--continue-from", "no-such-folder"], "--continue-from must be a toy model folder, got no-such-folder"),
        (["--continue-from", str(Path(__file__).parent)], "is not a trained toy model folder to continue from: it lacks unet"),
    ],
)
def test_pretrain_refuses_a_bad_device_batch_or_budget_before_any_work(tmp_path, capsys, flags, sentence):
    from studio.cli import main

    out = tmp_path / "run"
    assert main(["toy", "pretrain", "--out", str(out), "--stage", "backbone", *flags]) == 2
    assert sentence in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_the_backbone_stage_trains_checkpoints_resumes_and_exports_at_a_tiny_size(tmp_path):
    """The UNet + text encoder stage end to end on six renders, with identity tokens in every
    caption: a step budget, a checkpoint, a resume that goes on (W too), a loadable export."""
    import json
    import shutil

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from studio.toy.pretrain import PretrainPlan, has_fine_attention, stage_backbone, stage_data
    from studio.weights import TOY_DIR

    out = tmp_path / "run"
    plan = PretrainPlan(identities=3, views=2, heldout_identities=1, negatives=1, unet_batch=4, unet_minutes=30,
                        unet_steps=2, identity_token_share=1.0)
    stage_data(out, plan, workers=1)
    for part in ("vae", "image_encoder"):  # the shipped ones: this stage trains neither
        shutil.copytree(TOY_DIR / part, out / part)
    ckpt = out / "checkpoint"

    stage_backbone(out, plan)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    learned = load_file(str(ckpt / "identity_tokens.safetensors"))["weight"]
    assert learned.shape == (128, 128) and learned.abs().sum() > 0, "W starts at zero and learns"
    first_unet = load_file(str(ckpt / "unet.safetensors"))

    stage_backbone(out, replace(plan, unet_steps=3))  # the same command with a larger budget goes on
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert not torch.equal(load_file(str(ckpt / "identity_tokens.safetensors"))["weight"], learned)
    adam = torch.load(ckpt / "identity_tokens_optimizer.pt", weights_only=True)
    assert int(adam["state"][0]["step"]) == 3, "W's optimiser went on from its checkpoint, not from zero"
    assert any(not torch.equal(first_unet[k], v) for k, v in load_file(str(ckpt / "unet.safetensors")).items())

    record = json.loads((out / "pretrain.json").read_text())
    assert record["unet_steps"] == 3 and record["plan"]["identity_token_share"] == 1.0
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 128
    exported = {f.name for f in (out / "unet").iterdir()} | {f.name for f in (out / "text_encoder").iterdir()}
    assert not any("identity" in name for name in exported), "W is never exported"

    # a new run continues from the exported folder: its weights, its step count, a fresh warm-up
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(out / "data", again / "data")
    continued = replace(plan, unet_steps=3, identity_token_share=0.0, continue_from=str(out), min_snr_gamma=5.0,
                        unet_feature_weight=6.0, unet_head_width=32)
    stage_backbone(again, continued)  # stops at once: the folder is at step 3 already
    state = json.loads((again / "checkpoint" / "state.json").read_text())
    assert state["step"] == state["warmup_from"] == 3 and state["continued_from"]["unet_steps"] == 3
    seeded = load_file(str(again / "checkpoint" / "unet.safetensors"))
    assert all(torch.equal(seeded[k], v) for k, v in unet.state_dict().items())
    assert (again / "vae" / "decoder.json").exists(), "the folder's fine-tuned VAE came with it"
    stage_backbone(again, replace(continued, unet_steps=4, unet_head_width=None))
    state = json.loads((again / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["warmup_from"] == 3, "the warm-up counts from where the run continued"
    # the same weights with heads of width 32 (diffusers reads attention_head_dim as a head count), kept on resume
    heads = lambda model: model.mid_block.attentions[0].transformer_blocks[0].attn1.heads  # noqa: E731
    assert heads(unet) == 32 and heads(UNet2DConditionModel.from_pretrained(str(again / "unet"))) == 128 // 32
    assert state["unet_head_width"] == 32
    record = json.loads((again / "pretrain.json").read_text())
    assert record["continued_from"]["folder"] == str(out) and record["plan"]["min_snr_gamma"] == 5.0
    assert record["plan"]["unet_feature_weight"] == 6.0

    # attention at the 16 x 16 level added to a folder without it, then kept by a run continued without the flag
    fine, finer = tmp_path / "fine", tmp_path / "finer"
    for folder in (fine, finer):
        folder.mkdir()
        shutil.copytree(out / "data", folder / "data")
    stage_backbone(fine, replace(continued, continue_from=str(out), unet_steps=4, unet_fine_attention=True))
    assert json.loads((fine / "checkpoint" / "state.json").read_text())["unet_fine_attention"] is True
    assert has_fine_attention(fine / "unet") and not has_fine_attention(out / "unet")
    stage_backbone(finer, replace(continued, continue_from=str(fine), unet_steps=5))
    assert has_fine_attention(finer / "unet"), "a folder's fine attention is kept without the flag"
    assert json.loads((finer / "pretrain.json").read_text())["unet_steps"] == 5


def test_fine_attention_joins_a_toy_unet_as_an_exact_no_op_and_only_where_it_is_missing():
    import torch
    from diffusers import UNet2DConditionModel

    from studio.toy.pretrain import load_unet_weights, unet_config

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**unet_config(128))
    fine = UNet2DConditionModel(**unet_config(128, fine_attention=True))
    assert load_unet_weights(fine, plain.state_dict()) == [
        "down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"]
    assert fine.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads == 4, "heads of width 8 at 32 channels"
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 128)
    with torch.no_grad():
        assert torch.equal(plain(x, t, text).sample, fine(x, t, text).sample)
        fine.up_blocks[2].attentions[1].proj_out.weight.add_(0.1)  # the new layers do take part once trained
        assert not torch.equal(plain(x, t, text).sample, fine(x, t, text).sample)
    trained = {k: v.clone() for k, v in fine.state_dict().items()}
    assert load_unet_weights(fine, trained) == [], "weights that have the layers load as they are"
    assert torch.equal(fine.up_blocks[2].attentions[1].proj_out.weight, trained["up_blocks.2.attentions.1.proj_out.weight"])
    with pytest.raises(ValueError, match="do not fit this toy UNet"):
        load_unet_weights(plain, trained)


def test_min_snr_weights_cap_the_clean_steps_and_leave_the_noisy_ones():
    import torch
    from diffusers import DDPMScheduler

    from studio.backbone import SD15_SCHEDULER_CONFIG
    from studio.toy.pretrain import min_snr_weights

    alphas = DDPMScheduler(**SD15_SCHEDULER_CONFIG).alphas_cumprod
    t = torch.tensor([0, 50, 500, 999])
    weights = min_snr_weights(alphas, t, gamma=5.0)
    snr = alphas[t] / (1 - alphas[t])
    assert snr[0] > 5 > snr[2], "the schedule has steps on both sides of the cap"
    assert torch.allclose(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert torch.allclose(weights[snr > 5], 5 / snr[snr > 5])
    assert weights[0] < weights[1] < 1, "the cleaner the step, the smaller its weight"


def test_the_learning_rate_warms_up_then_holds_or_anneals_along_a_cosine_to_a_tenth():
    from studio.toy.pretrain import LEARNING_RATE, learning_rate

    assert learning_rate(100, warmup_from=0) == pytest.approx(LEARNING_RATE / 2)
    assert learning_rate(5000, warmup_from=0) == learning_rate(9000, warmup_from=0) == LEARNING_RATE
    anneal = (4000, 8000)
    rates = [learning_rate(step, 0, anneal) for step in (4000, 5000, 6000, 7000, 8000, 9000)]
    assert rates[0] == pytest.approx(LEARNING_RATE) and rates[2] == pytest.approx(0.55 * LEARNING_RATE)
    assert all(a > b for a, b in zip(rates[:5], rates[1:5])), "it falls all the way"
    assert rates[4] == rates[5] == pytest.approx(LEARNING_RATE / 10), "and then stays at a tenth"


def test_the_annealing_window_starts_where_it_was_first_asked_for_and_survives_a_resume(capsys):
    from studio.toy.pretrain import PretrainPlan, anneal_window

    state: dict = {}
    assert anneal_window(state, PretrainPlan(anneal=True, unet_steps=8000), step=4000) == (4000, 8000)
    assert state == {"anneal_from": 4000, "anneal_to": 8000}  # saved with the checkpoint
    assert anneal_window(state, PretrainPlan(anneal=True, unet_steps=8000), step=6000) == (4000, 8000), "resumed"
    assert anneal_window(state, PretrainPlan(anneal=True, unet_steps=9000), step=6000) == (4000, 9000)
    assert "now ends at step 9000 (it was to end at 8000)" in capsys.readouterr().err
    assert anneal_window(state, PretrainPlan(unet_steps=9000), step=7000) is None
    assert "without --anneal the rate is constant again" in capsys.readouterr().err
    with pytest.raises(ValueError, match="set unet_steps too"):
        PretrainPlan(anneal=True)


def test_centring_the_latent_space_moves_its_means_to_zero_and_decodes_every_image_as_before():
    import torch
    from diffusers import AutoencoderKL

    from studio.toy import models as toy_models
    from studio.toy.pretrain import center_latent_space, vae_config
    from studio.toy.world import render_prompt

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config()).eval()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.5, 0.5, 0.0])  # a latent space far off centre
    images = np.stack([np.asarray(render_prompt(7 + i, "a photo of {} on a beach", seed=i)) for i in range(8)])
    x = toy_models.to_input(images)
    with torch.no_grad():
        before = vae.encode(x).latent_dist.mean
        decoded_before = vae.decode(before).sample
    moved = center_latent_space(vae, images)
    assert moved is not None and moved.shape == (4,)
    with torch.no_grad():
        after = vae.encode(x).latent_dist.mean
        decoded_after = vae.decode(after).sample
    assert after.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(after, before - moved.view(1, 4, 1, 1), atol=1e-5)
    assert torch.allclose(decoded_after, decoded_before, atol=1e-4), "the shift is folded in exactly"
    assert center_latent_space(vae, images) is None, "a centred space is left as it is"


def test_feature_weights_peak_at_the_eyes_and_mouth_and_are_one_far_from_them():
    from studio.toy.pretrain import feature_weights

    landmarks = np.array([[[20, 24], [44, 24], [32, 34], [32, 46], [32, 32]]], np.float32)  # eyes, nose, mouth, centre
    w = feature_weights(landmarks, 4.0, 64)
    assert w.shape == (1, 1, 64, 64)
    for x, y in ((20, 24), (44, 24), (32, 46)):
        assert 4.9 < float(w[0, 0, y, x]) < 5.1, "1 + the weight at each feature"
    assert float(w[0, 0, 34, 32]) < 1.5, "the nose is not weighted"
    assert abs(float(w[0, 0, 2, 2]) - 1) < 1e-6 and float(w.min()) >= 1
    assert bool((feature_weights(landmarks, 0.0, 64) == 1).all()), "weight 0: every pixel alike"
    latent = feature_weights(landmarks, 4.0, 16)  # the UNet's loss: the same places at a quarter of the size
    assert latent.shape == (1, 1, 16, 16)
    assert int(latent[0, 0].argmax()) // 16 in (11, 12) and float(latent[0, 0, 6, 5]) > 3, "the mouth and the eyes"
    assert float(latent[0, 0, 8, 8]) < 1.5 and abs(float(latent[0, 0, 0, 0]) - 1) < 1e-6

    import torch

    from studio.toy.pretrain import _pixel_loss

    x = torch.zeros(1, 3, 64, 64)
    at_mouth, in_a_corner = x.clone(), x.clone()
    at_mouth[..., 44:49, 30:35] = 0.5
    in_a_corner[..., 0:5, 0:5] = 0.5
    assert torch.isclose(_pixel_loss(at_mouth, x, torch.ones(1, 1, 64, 64)), _pixel_loss(at_mouth, x))
    assert torch.isclose(_pixel_loss(at_mouth, x), _pixel_loss(in_a_corner, x)), "unweighted: where does not matter"
    assert _pixel_loss(at_mouth, x, w) > 2 * _pixel_loss(in_a_corner, x, w), "weighted: an error at the mouth costs more"


def test_the_decoder_stage_adds_a_round_to_a_continued_folder_and_leaves_the_encoder_alone(tmp_path):
    """A second round of decoder fine-tuning on the shipped VAE, at a tiny size: it starts from
    the folder's VAE, trains only the decoder, records both rounds, and is not run twice."""
    import json

    import torch
    from safetensors.torch import load_file

    from studio.toy.pretrain import PretrainPlan, decoder_rounds, stage_data, stage_decoder
    from studio.weights import TOY_DIR

    out = tmp_path / "run"
    plan = PretrainPlan(identities=2, views=2, heldout_identities=1, negatives=1, decoder_minutes=0.002, decoder_batch=2,
                        continue_from=str(TOY_DIR), decoder_rounds=2, decoder_feature_weight=4.0,
                        decoder_latent_noise=0.3)
    stage_data(out, plan, workers=1)
    shipped = decoder_rounds(TOY_DIR / "vae" / "decoder.json")
    assert len(shipped) >= 1, "the shipped decoder was fine-tuned"
    before = load_file(str(TOY_DIR / "vae" / "diffusion_pytorch_model.safetensors"))

    stage_decoder(out, replace(plan, decoder_rounds=len(shipped)))
    assert decoder_rounds(out / "vae" / "decoder.json") == shipped, "as many rounds as asked for: nothing ran"
    stage_decoder(out, replace(plan, decoder_rounds=len(shipped) + 1))
    rounds = decoder_rounds(out / "vae" / "decoder.json")
    assert rounds[:-1] == shipped and len(rounds) == len(shipped) + 1
    assert rounds[-1]["feature_weight"] == 4.0 and rounds[-1]["latent_noise"] == 0.3 and rounds[-1]["steps"] >= 1
    after = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    modified = (out / "vae" / "decoder.json").stat().st_mtime_ns
    stage_decoder(out, replace(plan, decoder_rounds=len(shipped) + 1))  # the same command again: done already
    assert (out / "vae" / "decoder.json").stat().st_mtime_ns == modified
    assert json.loads((out / "vae" / "decoder.json").read_text())["rounds"] == rounds
