"""``python -m studio``: end to end in a subprocess, and the error paths in-process (faster)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.cli import main
from studio.concept_file import load_concept, save_concept
from test_sampler import make_concept

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "studio", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def concept_file(backbone, tmp_path_factory) -> Path:
    return save_concept(make_concept(backbone, seed=8, bypass=True), tmp_path_factory.mktemp("cli") / "person.safetensors")


# --------------------------------------------------------------------------- end to end
def test_generate_writes_one_png_per_seed(concept_file, tmp_path):
    out = tmp_path / "chef.png"
    result = run_cli(
        "generate", "--preset", "tiny", "--concept", str(concept_file), "--prompt", "a photo of {} as a chef",
        "--out", str(out), "--steps", "2", "--num-images", "2", "--seed", "4", "--band", "300", "900",
        "--scheduler", "ddim",
    )
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "chef_0.png", tmp_path / "chef_1.png"]
    assert not out.exists() and all(p.is_file() for p in paths)
    images = [Image.open(p) for p in paths]
    assert images[0].size == (64, 64)  # the tiny preset's sample.resolution
    settings = [json.loads(image.text["personamagic"]) for image in images]
    assert [s["seed"] for s in settings] == [4, 5]
    assert settings[0]["band"] == [300, 900] and settings[0]["scheduler"] == "ddim"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert f"{paths[1]}: a photo of {{}} as a chef (seed 5)" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_bad_concept_file_is_one_line_and_exit_2(tmp_path):
    fake = tmp_path / "concept.safetensors"
    Image.new("RGB", (4, 4)).save(fake, format="PNG")
    result = run_cli("generate", "--preset", "tiny", "--concept", str(fake), "--prompt", "a photo of {}",
                     "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: concept.safetensors is not a concept file")
    assert "PNG image" in lines[0] and not (tmp_path / "x.png").exists()


def test_train_writes_a_usable_concept(faces_dir, tmp_path):
    out = tmp_path / "me.safetensors"
    result = run_cli("train", "--preset", "tiny", "--image", str(faces_dir / "single" / "f2d_0.jpg"), "--steps", "3",
                     "--out", str(out), "--seed", "1", "--set", "train.lr=0.01")
    assert result.returncode == 0, result.stderr
    concept = load_concept(out)
    assert concept.steps_done == 3 and concept.config["train"]["lr"] == 0.01 and concept.config["train"]["seed"] == 1
    assert concept.image_embedding is not None  # the tiny preset trains the image bypass
    assert "1 of 1 photos usable" in result.stdout and "trained 3 steps" in result.stdout
    assert f"saved {out}" in result.stdout


# --------------------------------------------------------------------------- stop and resume, in-process
def _ctrl_c_before_step(monkeypatch, step: int, presses: int = 1) -> None:
    """Press Ctrl-C (a real SIGINT to this process) ``presses`` times just before the trainer
    reports ``step``: the CLI sees the request with that step's event."""
    import signal

    from studio.events import TrainingStep
    from studio.trainer import Trainer

    original = Trainer.run

    def run(self, *args, **kwargs):
        for event in original(self, *args, **kwargs):
            if isinstance(event, TrainingStep) and event.step == step:
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)
            yield event

    monkeypatch.setattr(Trainer, "run", run)


def test_ctrl_c_saves_the_state_and_resume_finishes_the_same_run(faces_dir, tmp_path, monkeypatch, capsys):
    photo = str(faces_dir / "single" / "f2d_0.jpg")
    common = ["train", "--preset", "tiny", "--image", photo, "--steps", "4", "--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "straight.safetensors")]) == 0
    capsys.readouterr()

    checkpoint = tmp_path / "run.safetensors"
    with monkeypatch.context() as patch:
        _ctrl_c_before_step(patch, 2)
        code = main([*common, "--out", str(tmp_path / "half.safetensors"), "--checkpoint", str(checkpoint)])
    out = capsys.readouterr()
    assert code == 130 and "stopping after this step" in out.err
    assert "stopped at step 2 of 4" in out.out and f"--resume {checkpoint}" in out.out
    assert load_concept(tmp_path / "half.safetensors").steps_done == 2  # the work so far is kept

    assert main([*common, "--out", str(tmp_path / "resumed.safetensors"), "--resume", str(checkpoint)]) == 0
    assert "resumed" in capsys.readouterr().out
    straight, resumed = load_concept(tmp_path / "straight.safetensors"), load_concept(tmp_path / "resumed.safetensors")
    assert resumed.steps_done == 4
    for key, value in straight.mapper.state_dict().items():
        assert torch.equal(value, resumed.mapper.state_dict()[key]), key

    # The checkpoint went on to step 4: going further needs more steps; other photos are refused.
    assert main([*common, "--out", str(tmp_path / "again.safetensors"), "--resume", str(checkpoint)]) == 2
    assert "already at step 4 of 4; pass --steps with more than 4" in _error_line(capsys)
    other = ["train", "--preset", "tiny", "--image", str(faces_dir / "single" / "f2d_1.jpg"), "--steps", "6"]
    assert main([*other, "--seed", "3", "--out", str(tmp_path / "x.safetensors"), "--resume", str(checkpoint)]) == 2
    assert "made with other photos" in _error_line(capsys)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_saved_concept_is_enough_to_train_further(faces_dir, tmp_path, capsys):
    """Without --checkpoint, the concept file carries the state: --resume it with more steps."""
    photo = str(faces_dir / "single" / "f2d_0.jpg")
    common = ["train", "--preset", "tiny", "--image", photo, "--seed", "2"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "straight.safetensors")]) == 0
    me = tmp_path / "me.safetensors"
    assert main([*common, "--steps", "2", "--out", str(me)]) == 0
    assert main([*common, "--steps", "4", "--resume", str(me), "--out", str(me)]) == 0
    assert "resumed" in capsys.readouterr().out
    straight, resumed = load_concept(tmp_path / "straight.safetensors"), load_concept(me)
    assert resumed.steps_done == 4
    for key, value in straight.mapper.state_dict().items():
        assert torch.equal(value, resumed.mapper.state_dict()[key]), key


def test_a_second_ctrl_c_quits_at_once(faces_dir, tmp_path, monkeypatch, capsys):
    _ctrl_c_before_step(monkeypatch, 1, presses=2)
    out = tmp_path / "c.safetensors"
    assert main(["train", "--preset", "tiny", "--image", str(faces_dir / "single" / "f2d_0.jpg"), "--steps", "3",
                 "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted") and not out.exists()


def test_checkpoint_options_are_checked_before_any_work(backbone, tmp_path, capsys):
    base = ["train", "--preset", "tiny", "--image", "x.jpg", "--out", str(tmp_path / "c.safetensors")]
    assert main([*base, "--checkpoint", str(tmp_path / "c.safetensors")]) == 2
    assert "two different files" in _error_line(capsys)
    assert main([*base, "--checkpoint", str(tmp_path / "state.ckpt")]) == 2
    assert "must end with .safetensors" in _error_line(capsys)
    assert main([*base, "--resume", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in _error_line(capsys)
    save_concept(make_concept(backbone), tmp_path / "concept.safetensors")
    assert main([*base, "--resume", str(tmp_path / "concept.safetensors")]) == 2
    assert "is a concept without a training state" in _error_line(capsys)


# --------------------------------------------------------------------------- errors, in-process
def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "a photo of a chef"], "has no {} for the person"),
        (["--prompt", "{} at sea", "--band", "900", "100"], "got start 900, end 100"),
        (["--prompt", "{} at sea", "--scheduler", "lms"], "Unknown scheduler 'lms'"),
        (["--prompt", "{} at sea", "--set", "sample.nonsense=1"], "sample.nonsense"),
        (["--prompt", "{} at sea", "--set", "sample.steps"], "--set expects key=value"),
        (["--prompt", "{} at sea", "--num-images", "0"], "--num-images must be >= 1"),
    ],
)
def test_generate_user_errors_exit_2(concept_file, tmp_path, capsys, extra, match):
    code = main(["generate", "--preset", "tiny", "--concept", str(concept_file), "--out", str(tmp_path / "o.png"), *extra])
    assert code == 2
    assert match in _error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_outputs_are_checked_before_any_work(concept_file, tmp_path, capsys):
    assert main(["generate", "--preset", "tiny", "--concept", str(concept_file), "--prompt", "{}",
                 "--out", str(tmp_path / "nowhere" / "o.png")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(["generate", "--preset", "tiny", "--prompt", "{}", "--out", str(tmp_path / "o.gif")]) == 2
    assert "must end with .png" in _error_line(capsys)
    assert main(["train", "--preset", "tiny", "--image", "x.jpg", "--out", str(tmp_path / "c.pt")]) == 2
    assert "must end with .safetensors" in _error_line(capsys)
    assert main(["generate", "--preset", "nope", "--prompt", "{}", "--out", str(tmp_path / "o.png")]) == 2
    assert "no preset 'nope'" in _error_line(capsys)


def test_train_without_a_usable_photo_exits_2(tmp_path, capsys):
    not_a_photo = tmp_path / "selfie.jpg"
    not_a_photo.write_text("this is not an image")
    code = main(["train", "--preset", "tiny", "--image", str(not_a_photo), "--out", str(tmp_path / "c.safetensors")])
    assert code == 2
    _error_line(capsys)
    assert not (tmp_path / "c.safetensors").exists()


def test_a_missing_subcommand_module_is_explained(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "studio.cli_eval", None)  # makes `import studio.cli_eval` fail
    assert main(["eval", "--anything"]) == 2
    assert "the 'eval' command is not available in this installation" in _error_line(capsys)


# --------------------------------------------------------------------------- ablations end to end
@pytest.mark.parametrize(
    "setting, check",
    [
        ("train.cgdr_weight=0.5", lambda c: c.config["train"]["cgdr_weight"] == 0.5 and c.method == "personamagic"),
        ("concept.method=ti", lambda c: c.method == "ti" and c.num_tokens == 1 and not c.stage_regulation),
    ],
    ids=["cgdr", "ti"],
)
def test_an_ablation_trains_generates_exports_imports_and_evaluates(setting, check, faces_dir, tmp_path, capsys):
    from studio.cli_eval import main as eval_main
    from studio.config import load_preset
    from studio.engine import Engine

    photo = faces_dir / "single" / "f2d_0.jpg"
    trained = tmp_path / "trained.safetensors"
    assert main(["train", "--preset", "tiny", "--image", str(photo), "--steps", "3", "--set", setting,
                 "--out", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out
    assert ("class-guided regularization" in out) == setting.startswith("train.cgdr")
    assert check(load_concept(trained))

    image = tmp_path / "me.png"
    assert main(["generate", "--preset", "tiny", "--concept", str(trained), "--prompt", "{} on the beach",
                 "--out", str(image), "--steps", "2"]) == 0
    assert image.is_file()

    engine = Engine(load_preset("tiny"), session_id=f"cli-{setting}")
    try:
        engine.import_concept(str(trained))
        exported = engine.export_concept(tmp_path / "exported.safetensors")
        assert check(engine.current_concept())
    finally:
        engine.close()
    reimported = load_concept(exported)
    assert check(reimported)
    for key, value in load_concept(trained).mapper.state_dict().items():
        assert torch.equal(value, reimported.mapper.state_dict()[key]), key

    capsys.readouterr()
    assert eval_main(["--preset", "tiny", "--concept", str(exported), "--seeds", "0", "--steps", "1",
                      "--reference", str(photo), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "scores.csv").is_file()
