"""``python -m studio compose``: the command in-process on tiny, and its plain-sentence refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from studio.cli import main
from studio.concept_file import save_concept
from test_sampler import make_concept


@pytest.fixture(scope="module")
def concepts(backbone, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compose")
    return {
        "a": save_concept(make_concept(backbone, seed=11), folder / "a.safetensors"),
        "b": save_concept(make_concept(backbone, seed=12), folder / "b.safetensors"),
        "foreign": save_concept(make_concept(backbone, seed=13, source="some/fine-tune"), folder / "f.safetensors"),
    }


def test_compose_writes_the_image_and_its_region_overlay(concepts, tmp_path, capsys):
    out = tmp_path / "pair.png"
    code = main(["compose", "--preset", "tiny", "--concept", str(concepts["a"]), "--concept", str(concepts["b"]),
                 "--prompt", "{0} and {1} at a cafe", "--seed", "5", "--steps", "2", "--boxes", "left-right", "--out", str(out)])
    assert code == 0
    settings = json.loads(Image.open(out).text["personamagic"])
    assert settings["seed"] == 5 and settings["mode"] == "regions" and settings["boxes"] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    assert Image.open(tmp_path / "pair_regions.png").size == Image.open(out).size
    width, height = Image.open(out).size
    assert height == 64 and width > height, "two people get the wide picture"
    assert "1 UNet pass per step" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("people", "prompt", "message"),
    [
        (["a", "b"], "{0} at a cafe", "must name each of the 2 people once"),
        (["a", "b", "a"], "{0}, {1} and {2}", "at most 2 in one picture"),
        (["a", "foreign"], "{0} and {1}", "trained on different models"),
    ],
)
def test_bad_compositions_end_in_one_sentence(concepts, tmp_path, capsys, people, prompt, message):
    args = ["compose", "--preset", "tiny", "--prompt", prompt, "--steps", "1", "--out", str(tmp_path / "x.png")]
    for key in people:
        args += ["--concept", str(concepts[key])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_compose_without_people_or_with_a_bad_box_is_refused(concepts, tmp_path, capsys):
    assert main(["compose", "--preset", "tiny", "--prompt", "{0}", "--out", str(tmp_path / "x.png")]) == 2
    assert "give the people" in capsys.readouterr().err
    assert main(["compose", "--preset", "tiny", "--concept", str(concepts["a"]), "--prompt", "{0}",
                 "--boxes", "0,0,1", "--out", str(tmp_path / "x.png")]) == 2
    assert "four numbers" in capsys.readouterr().err


def test_compose_takes_style_loras_and_records_them(concepts, backbone, tmp_path, capsys):
    from test_lora import kohya_lora

    from safetensors.torch import save_file

    style = tmp_path / "ink.safetensors"
    save_file(kohya_lora(backbone, seed=3), str(style))
    args = ["compose", "--preset", "tiny", "--concept", str(concepts["a"]), "--concept", str(concepts["b"]),
            "--prompt", "{0} and {1} at a cafe", "--steps", "2", "--boxes", "left-right"]
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--lora", f"{style}:0.8", "--out", str(tmp_path / "styled.png")]) == 0
    plain, styled = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "styled.png")
    assert json.loads(plain.text["personamagic"])["loras"] == []
    records = json.loads(styled.text["personamagic"])["loras"]
    assert [(r["name"], r["strength"]) for r in records] == [("ink.safetensors", 0.8)]
    assert list(plain.getdata()) != list(styled.getdata())  # the LoRA changed the picture
    capsys.readouterr()
    assert main([*args, "--lora", str(tmp_path / "plain.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "x.png").exists()
