"""Real-weight layouts, offline: each through the CLI (train 2 steps, generate) with its expected
outcome or sentence, on small random SD-1.x-shaped models written by tests/model_layouts.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_layouts import HUB_REPO, build_all
from studio.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def photo(faces_dir) -> str:
    return str(faces_dir / "single" / "f2d_0.jpg")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def _model_args(layouts, source: str, *extra: str) -> list[str]:
    # the tiny preset's small settings (cpu, fp32, 64 px) on a model given as a user gives it
    return ["--preset", "tiny", "--model", source, "--image-encoder", str(layouts["image_encoder"]), *extra]


def _train_and_generate(layouts, photo, tmp_path, capsys, source: str, *extra: str) -> tuple[str, str]:
    concept = tmp_path / "me.safetensors"
    code = main(["train", *_model_args(layouts, source, *extra), "--image", photo, "--steps", "2", "--out", str(concept)])
    train_out = capsys.readouterr()
    assert code == 0, train_out.err
    assert "trained 2 steps" in train_out.out
    code = main(["generate", *_model_args(layouts, source, *extra), "--concept", str(concept), "--prompt",
                 "a photo of {}", "--steps", "2", "--out", str(tmp_path / "out.png")])
    gen_out = capsys.readouterr()
    assert code == 0, gen_out.err
    assert (tmp_path / "out.png").is_file()
    return train_out.out + gen_out.out, train_out.err + gen_out.err


@pytest.mark.parametrize("layout", ["folder", "fp16", "single_file", "sd2"])
def test_each_supported_layout_trains_and_generates(layouts, photo, tmp_path, capsys, layout):
    extra = ["--set", f"model.single_file_config={layouts['folder']}"] if layout == "single_file" else []
    out, err = _train_and_generate(layouts, photo, tmp_path, capsys, str(layouts[layout]), *extra)
    assert "Traceback" not in err and "likeness may be weaker" not in err
    upcast = "stored in half precision and run upcast to float32"
    assert (upcast in out) == (layout == "fp16")


def test_the_same_weights_by_folder_file_or_fp16_are_the_same_model(layouts, photo, tmp_path, capsys):
    """A concept trained on the folder: no 'likeness may be weaker' on the single file or the fp16 copy;
    a different model of the same width (SD2-shaped) does get it."""
    concept = tmp_path / "c.safetensors"
    assert main(["train", *_model_args(layouts, str(layouts["folder"])), "--image", photo, "--steps", "2",
                 "--out", str(concept)]) == 0
    sources = {
        "single_file": ["--set", f"model.single_file_config={layouts['folder']}"], "fp16": [], "sd2": [],
    }
    for layout, extra in sources.items():
        capsys.readouterr()
        assert main(["generate", *_model_args(layouts, str(layouts[layout]), *extra), "--concept", str(concept),
                     "--prompt", "{}", "--steps", "1", "--out", str(tmp_path / f"{layout}.png")]) == 0
        warned = "likeness may be weaker" in capsys.readouterr().err
        assert warned == (layout == "sd2"), layout


def test_a_filled_hub_cache_trains_and_generates_offline(layouts, photo, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(layouts["hub_cache"]), "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--model", HUB_REPO, "--image-encoder", str(layouts["image_encoder"])]
    concept = tmp_path / "hub.safetensors"
    for args in (
        ["train", *common, "--image", photo, "--steps", "2", "--out", str(concept)],
        ["generate", *common, "--concept", str(concept), "--prompt", "{}", "--steps", "1", "--out", str(tmp_path / "h.png")],
    ):
        result = subprocess.run([sys.executable, "-m", "studio", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "likeness may be weaker" not in result.stderr
    assert (tmp_path / "h.png").is_file()


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ("bin", ["tiny-sd-bin/text_encoder holds only .bin (pickled) weights", "safetensors"]),
        ("sdxl", ["is a Stable Diffusion XL model (StableDiffusionXLPipeline in model_index.json)",
                  "supports Stable Diffusion 1.x and 2.x"]),
    ],
)
def test_refused_layouts_are_one_sentence_before_any_weight_loads(layouts, photo, tmp_path, capsys, monkeypatch,
                                                                   layout, words):
    import studio.backbone

    monkeypatch.setattr(studio.backbone, "build_backbone", lambda cfg: pytest.fail("weights were loaded"))
    for command in (["train", "--image", photo, "--out", str(tmp_path / "c.safetensors")],
                    ["generate", "--prompt", "{}", "--out", str(tmp_path / "o.png")]):
        assert main([*command, *_model_args(layouts, str(layouts[layout]))]) == 2
        line = _error_line(capsys)
        for word in words:
            assert word in line
        assert "TypeError" not in line and "use_safetensors" not in line


def test_a_single_file_of_another_shape_names_the_config_setting(layouts, tmp_path, capsys):
    """Without model.single_file_config the shipped SD 1.5 configs are used: a small checkpoint does not fit."""
    assert main(["generate", *_model_args(layouts, str(layouts["single_file"])), "--prompt", "{}",
                 "--out", str(tmp_path / "o.png")]) == 2
    line = _error_line(capsys)
    assert "shaped unlike the configs in" in line and "sd15-config" in line and "model.single_file_config" in line


def test_pickled_checkpoints_are_refused_before_torch_is_imported(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"never unpickled")
    code = (
        "import sys; from studio.cli import main; "
        f"rc = main(['generate', '--model', {str(ckpt)!r}, '--prompt', '{{}}', '--out', {str(tmp_path / 'o.png')!r}]); "
        "print('rc', rc, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "rc 2 False" in result.stdout, result.stdout + result.stderr
    assert "pickled checkpoints are not loaded" in result.stderr


def test_a_missing_image_encoder_is_named_with_its_files_and_the_way_around_it(layouts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--preset", "tiny", "--model", str(layouts["folder"]), "--image-encoder", "nobody/clip-b32",
                 "--image", "x.jpg", "--out", str(tmp_path / "c.safetensors")]) == 2
    line = _error_line(capsys)
    assert "The CLIP image encoder 'nobody/clip-b32' (model.image_encoder) is not available" in line
    assert "image bypass" in line
    assert "hf download nobody/clip-b32 config.json preprocessor_config.json model.safetensors" in line
    assert "--set concept.use_bypass=false" in line
    # ... and without the bypass the same model trains
    out = tmp_path / "nobypass.safetensors"
    photo = str(Path(os.environ.get("STUDIO_FACES_DIR", REPO.parent / "shared" / "data" / "faces")) / "single" / "f2d_0.jpg")
    assert main(["train", "--preset", "tiny", "--model", str(layouts["folder"]), "--image-encoder", "none",
                 "--image", photo, "--steps", "2", "--out", str(out)]) == 0


def test_the_sd15_preset_offline_names_both_the_image_encoder_and_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["generate", "--preset", "sd15", "--prompt", "{}", "--out", str(tmp_path / "o.png")]) == 2
    line = _error_line(capsys)
    assert line.index("openai/clip-vit-base-patch32") < line.index("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "hf download openai/clip-vit-base-patch32 config.json preprocessor_config.json model.safetensors" in line
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 model_index.json" in line
    assert "unet/diffusion_pytorch_model.safetensors" in line and "safety_checker" not in line


def test_a_concept_of_another_width_is_refused_before_the_weights_load(layouts, backbone, tmp_path, capsys, monkeypatch):
    import studio.backbone
    from studio.concept_file import save_concept
    from test_sampler import make_concept

    concept = make_concept(backbone)
    concept.backbone.update(token_dim=768, source="stable-diffusion-v1-5/stable-diffusion-v1-5")
    path = save_concept(concept, tmp_path / "sd15.safetensors")
    monkeypatch.setattr(studio.backbone, "build_backbone", lambda cfg: pytest.fail("weights were loaded"))
    assert main(["generate", *_model_args(layouts, str(layouts["folder"])), "--concept", str(path), "--prompt", "{}",
                 "--out", str(tmp_path / "o.png")]) == 2
    line = _error_line(capsys)
    assert "trained on stable-diffusion-v1-5/stable-diffusion-v1-5 (width 768)" in line and "has width 32" in line


def test_model_without_preset_uses_the_sd15_settings(layouts, monkeypatch):
    from studio.cli import _load_config, build_parser

    args = build_parser().parse_args(["generate", "--model", str(layouts["folder"]), "--prompt", "{}", "--out", "o.png"])
    cfg = _load_config(args)
    assert cfg.name == "sd15" and cfg.model.source == str(layouts["folder"])

    import app

    demo = app.create_demo(None, str(layouts["folder"]), str(layouts["image_encoder"]))
    assert demo.sessions.cfg.name == "sd15" and demo.sessions.cfg.model.source == str(layouts["folder"])
    demo.close()


def test_the_app_refuses_a_bad_model_at_start_in_one_line(layouts):
    result = subprocess.run([sys.executable, "app.py", "--model", str(layouts["sdxl"])], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "error: " in result.stderr and "Stable Diffusion XL" in result.stderr and "Traceback" not in result.stderr


def test_the_app_checks_a_model_when_chosen_and_says_which_loaded(studio_app, layouts, photo):
    from gradio_client import Client, handle_file

    _demo, url = studio_app
    client = Client(url, verbose=False, analytics_enabled=False)
    try:
        with pytest.raises(Exception, match="Stable Diffusion XL"):
            client.predict(str(layouts["sdxl"]), "tiny", api_name="/model_source")
        banner, note = client.predict(str(layouts["fp16"]), str(layouts["image_encoder"]), api_name="/model_source")
        assert f"Loaded {layouts['fp16']}" in note and "upcast to float32" in note
        client.predict([handle_file(photo)], api_name="/photos")
        args = [2, 3e-3, 1, 0, 200, 900, 1e-3, 0.5, 0, 0.0, 400, 800, 1.0]  # ... preview every, CGDR weight, band, γ
        status = client.predict(*args, api_name="/train")[0]
        assert "Finished" in status and str(layouts["fp16"]) in status
    finally:
        client.close()


def test_the_shipped_single_file_configs_are_sd15(layouts):
    """assets/sd15-config holds SD 1.5's shapes (those of bench/sd15.py's full-size build)."""
    sys.path.insert(0, str(REPO))
    from bench.sd15 import UNET_CONFIG, VAE_CONFIG
    from studio.weights import SD15_CONFIG_DIR

    unet = json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text())
    for key, value in UNET_CONFIG.items():
        if key in unet:
            assert unet[key] == (list(value) if isinstance(value, tuple) else value), key
    vae = json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert vae[key] == (list(VAE_CONFIG[key]) if isinstance(VAE_CONFIG[key], tuple) else VAE_CONFIG[key]), key
    assert json.loads((SD15_CONFIG_DIR / "text_encoder" / "config.json").read_text())["hidden_size"] == 768
    assert not (SD15_CONFIG_DIR / "safety_checker").exists() and not (SD15_CONFIG_DIR / "feature_extractor").exists()
