"""Concept and checkpoint files: exact round trips, safe refusal of every bad file, atomic saves."""
from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import pickle
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from studio import concept_file as concept_module
from studio.concept import describe
from studio.concept_file import (
    ConceptFileError,
    compatibility_warning,
    concept_to_bytes,
    load_checkpoint,
    load_concept,
    read_concept_info,
    read_training_state,
    save_checkpoint,
    save_concept,
)
from studio.sampler import Sampler
from test_sampler import FAST, make_concept, pixels


@pytest.fixture(scope="module")
def concept(backbone):
    return make_concept(backbone, seed=4, bypass=True)


@pytest.fixture()
def saved(concept, tmp_path) -> pathlib.Path:
    return save_concept(concept, tmp_path / "person.safetensors")


def _rewrite_metadata(data: bytes, edit) -> bytes:
    """A copy of a concept file whose PersonaMagic JSON went through ``edit(dict)``."""
    from safetensors.torch import load

    (header_len,) = struct.unpack("<Q", data[:8])
    info = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["personamagic"])
    edit(info)
    return save_safetensors(load(data), metadata={"personamagic": json.dumps(info)})


# --------------------------------------------------------------------------- round trips
def test_round_trip_keeps_every_tensor_and_setting(backbone, concept, saved):
    loaded = load_concept(saved, backbone)
    original, restored = concept.mapper.state_dict(), loaded.mapper.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name].cpu(), restored[name].cpu()), name
    assert torch.equal(concept.image_embedding, loaded.image_embedding)
    for field in ("super_category", "train_band", "late_stage", "backbone", "steps_done", "config", "tokens", "num_tokens"):
        assert getattr(loaded, field) == getattr(concept, field), field
    assert loaded.mapper.has_bypass and not loaded.mapper.training
    assert not any(p.requires_grad for p in loaded.mapper.parameters())

    info = read_concept_info(saved)
    assert info["format"] == "personamagic-studio-concept" and info["format_version"] == 1
    assert info["tokens"] == ["<id1>", "<id2>"] and info["backbone"]["token_dim"] == backbone.token_dim
    assert {"created", "studio_version", "config", "num_anchors", "hidden_dim", "time_encoding_dim"} <= info.keys()
    assert "<id1> <id2> (face), 7 training steps on tiny" in describe(loaded)


def test_loaded_concept_generates_bit_identical_images(backbone, concept, saved):
    from_memory = pixels(Sampler(backbone)(concept, "{} as a chef", seeds=[0, 1], band=(0, 1000), **FAST))
    from_file = pixels(Sampler(backbone)(load_concept(saved, backbone), "{} as a chef", seeds=[0, 1], band=(0, 1000), **FAST))
    assert all(np.array_equal(a, b) for a, b in zip(from_memory, from_file))


def test_bytes_and_path_give_the_same_concept_and_cache_key(backbone, concept, saved):
    data = concept_to_bytes(concept)
    from_bytes, from_path = load_concept(data, backbone), load_concept(saved, backbone)
    assert torch.equal(from_bytes.mapper.head.weight, from_path.mapper.head.weight)
    # The uid is a hash of the file, so re-importing the same file reuses cached text conditions ...
    assert load_concept(saved).uid == from_path.uid
    sampler = Sampler(backbone)
    sampler(from_path, "a photo of {}", **FAST)
    sampler(load_concept(saved, backbone), "a photo of {}", **FAST)
    assert sampler.text_encoder_calls == 1
    # ... and other weights never share one.
    assert load_concept(concept_to_bytes(make_concept(backbone, seed=5))).uid != from_path.uid


def test_concept_without_bypass_round_trips(backbone, tmp_path):
    plain = make_concept(backbone, seed=6)
    loaded = load_concept(save_concept(plain, tmp_path / "plain.safetensors"), backbone)
    assert loaded.image_embedding is None and not loaded.mapper.has_bypass
    assert torch.equal(loaded.mapper.head.bias, plain.mapper.head.bias)


# --------------------------------------------------------------------------- bad files
def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_bad_file_gets_its_own_message(backbone, concept, tmp_path):
    good = concept_to_bytes(concept)
    (header_len,) = struct.unpack("<Q", good[:8])
    cases = {
        "photo.safetensors": (_png_bytes(), "looks like a PNG image"),
        "notes.safetensors": (b"my concept, see the attached photos\n" * 3, "looks like a text file"),
        "empty.safetensors": (b"", "is empty"),
        "cut-header.safetensors": (good[: 8 + header_len // 2], "is truncated"),
        "cut-data.safetensors": (good[:-100], "is truncated: it has"),
        "padded.safetensors": (good + b"\0" * 16, "extra bytes"),
        "model.safetensors": (save_safetensors({"encoder.weight": torch.zeros(3, 3)}), "not a PersonaMagic concept.*another kind"),
        "lora.safetensors": (
            save_safetensors({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, metadata={"ss_network_dim": "4"}),
            "not a PersonaMagic concept: it looks like a LoRA",
        ),
        "future.safetensors": (_rewrite_metadata(good, lambda i: i.update(format_version=99)), "newer PersonaMagic Studio.*version 99"),
        "wrong-format.safetensors": (_rewrite_metadata(good, lambda i: i.update(format="something-else")), "unknown format"),
        "no-settings.safetensors": (_rewrite_metadata(good, lambda i: i.pop("num_anchors")), "lacks num_anchors"),
        "bigger.safetensors": (_rewrite_metadata(good, lambda i: i.update(hidden_dim=17)), "shape"),
        "odd-steps.safetensors": (_rewrite_metadata(good, lambda i: i.update(steps_done="many")), "steps_done = many, but it must be a whole number"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConceptFileError, match=match):
            load_concept(path, backbone)
        with pytest.raises(ConceptFileError, match=match.replace("is truncated: it has", "is truncated")):
            load_concept(data, backbone)  # the same answer for an upload


def test_missing_tensor_is_named(backbone, concept):
    from safetensors.torch import load

    data = concept_to_bytes(concept)
    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    tensors = load(data)
    del tensors["mapper.head.weight"]
    with pytest.raises(ConceptFileError, match="missing: mapper.head.weight"):
        load_concept(save_safetensors(tensors, metadata=metadata), backbone)
    tensors = load(data)
    tensors["image_embedding"] = tensors["image_embedding"][:3]
    with pytest.raises(ConceptFileError, match=r"tensor image_embedding has shape \(3,\), but its metadata implies \(32,\)"):
        load_concept(save_safetensors(tensors, metadata=metadata), backbone)


def test_concept_from_a_wider_text_encoder_is_refused_by_name(backbone, concept):
    sd15 = {"source": "runwayml/stable-diffusion-v1-5", "token_dim": 768, "text_layers": 12, "vocab_size": 49408, "image_embed_dim": 512}
    data = _rewrite_metadata(concept_to_bytes(concept), lambda i: i.update(backbone=sd15))
    with pytest.raises(ConceptFileError, match=r"trained on runwayml/stable-diffusion-v1-5 \(width 768\).*runs tiny \(width 32\)"):
        load_concept(data, backbone)
    # Without a backbone the file still contradicts itself (32-wide tensors, 768 in its metadata).
    with pytest.raises(ConceptFileError, match="its tensors are 32 wide, but its metadata says the text encoder is 768 wide"):
        load_concept(data)


def test_same_width_other_source_loads_with_a_warning(backbone):
    other = make_concept(backbone, seed=7, source="some/fine-tune")
    loaded = load_concept(concept_to_bytes(other), backbone)
    assert "trained on 'some/fine-tune'" in compatibility_warning(loaded, backbone)
    assert compatibility_warning(make_concept(backbone), backbone) is None


class _Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickles_are_refused_without_being_unpickled(backbone, tmp_path):
    marker = tmp_path / "unpickled.marker"
    evil = pickle.dumps(_Payload(marker))
    zipped = io.BytesIO()
    torch.save({"payload": _Payload(marker)}, zipped)  # the .pt/.ckpt container
    for name, data in (("evil.safetensors", evil), ("evil-zip.safetensors", zipped.getvalue())):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConceptFileError, match="pickle|zip archive"):
            load_concept(path, backbone)
        with pytest.raises(ConceptFileError):
            load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: the refusal above is what kept it from running
    assert marker.exists()


# --------------------------------------------------------------------------- saving safely
@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_disk_full_on_save_leaves_no_partial_file(concept, tmp_path, monkeypatch, failing):
    target = tmp_path / "person.safetensors"
    target.write_bytes(b"the previous export")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(concept_module.os, failing, disk_full)
    with pytest.raises(ConceptFileError, match="Not enough disk space to save the concept"):
        save_concept(concept, target)
    monkeypatch.undo()
    assert target.read_bytes() == b"the previous export"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["person.safetensors"]  # no temp file left


def test_unwritable_destinations_are_explained(concept, tmp_path):
    with pytest.raises(ConceptFileError, match="does not exist"):
        save_concept(concept, tmp_path / "missing" / "c.safetensors")
    with pytest.raises(ConceptFileError, match="is a folder"):
        save_concept(concept, tmp_path)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_keeps_types_and_values(backbone, tmp_path):
    mapper = make_concept(backbone).mapper.requires_grad_(True)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=1e-2)
    mapper(torch.tensor([500])).sum().backward()
    optimizer.step()
    state = {
        "format": 1,
        "step": 12,
        "mapper": {k: v.clone() for k, v in mapper.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": None,
        "generator": torch.Generator().manual_seed(3).get_state(),
        "python_random": random.Random(5).getstate(),
        "numpy_random": np.random.RandomState(6).get_state(),
        "odd": {(1, 2): "tuple key", "__looks_tagged": [1.5, -2.0], 7: torch.float16},
    }
    with pytest.raises(ConceptFileError, match="not a finite number"):  # JSON has no infinity: refused at saving
        save_checkpoint(tmp_path / "inf.safetensors", {**state, "odd": [float("inf")]})
    assert not (tmp_path / "inf.safetensors").exists()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt.safetensors", state))

    assert loaded["step"] == 12 and loaded["scaler"] is None
    assert loaded["optimizer"]["param_groups"][0]["betas"] == optimizer.state_dict()["param_groups"][0]["betas"]
    assert isinstance(loaded["optimizer"]["param_groups"][0]["betas"], tuple)
    assert sorted(loaded["optimizer"]["state"]) == sorted(optimizer.state_dict()["state"])  # int keys
    assert torch.equal(loaded["generator"], state["generator"])
    assert loaded["python_random"] == state["python_random"]
    assert loaded["odd"] == {(1, 2): "tuple key", "__looks_tagged": [1.5, -2.0], 7: torch.float16}
    restored = np.random.RandomState()
    restored.set_state(loaded["numpy_random"])
    assert restored.randint(0, 2**31, 5).tolist() == np.random.RandomState(6).randint(0, 2**31, 5).tolist()

    # Resuming from the file continues exactly like the optimiser that never stopped.
    resumed_mapper = make_concept(backbone).mapper.requires_grad_(True)
    resumed_mapper.load_state_dict(loaded["mapper"])
    resumed = torch.optim.AdamW(resumed_mapper.parameters(), lr=1e-2)
    resumed.load_state_dict(loaded["optimizer"])
    for model, opt in ((mapper, optimizer), (resumed_mapper, resumed)):
        opt.zero_grad()
        model(torch.tensor([650])).square().sum().backward()
        opt.step()
    assert torch.equal(mapper.head.weight, resumed_mapper.head.weight)


def test_checkpoint_and_concept_files_are_not_confused(concept, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt.safetensors", {"step": 1, "w": torch.ones(2)})
    with pytest.raises(ConceptFileError, match="training checkpoint, not a concept"):
        load_concept(checkpoint)
    with pytest.raises(ConceptFileError, match="is a concept, not a training checkpoint"):
        load_checkpoint(save_concept(concept, tmp_path / "c.safetensors"))
    with pytest.raises(ConceptFileError, match="cannot store a object"):
        save_checkpoint(tmp_path / "bad.safetensors", {"thing": object()})
    assert not (tmp_path / "bad.safetensors").exists()


def test_trainer_resumes_exactly_from_a_checkpoint_file(backbone, tiny_cfg, tmp_path):
    from studio.events import TrainingStep
    from studio.trainer import Trainer, TrainingPhoto

    cfg = tiny_cfg.replace(**{"train.steps": 3, "train.preview_every": 0})
    photo = TrainingPhoto(Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)))
    trainer = Trainer(backbone, cfg, [photo])
    list(trainer.run(until=1))
    path = save_checkpoint(tmp_path / "paused.safetensors", trainer.state_dict())
    uninterrupted = [e.loss for e in trainer.run() if isinstance(e, TrainingStep)]

    resumed = Trainer(backbone, cfg, [photo])
    resumed.load_state_dict(load_checkpoint(path))
    assert [e.loss for e in resumed.run() if isinstance(e, TrainingStep)] == uninterrupted
    assert torch.equal(resumed.mapper.head.weight, trainer.mapper.head.weight)


def test_a_concept_file_can_carry_its_trainer_state(backbone, tiny_cfg, tmp_path):
    """The state rides along in ``training.*`` tensors and the metadata; the concept itself
    loads the same with it or without it, and a file without one says so (None)."""
    from studio.trainer import Trainer, TrainingPhoto

    cfg = tiny_cfg.replace(**{"train.steps": 2, "train.preview_every": 0})
    photo = TrainingPhoto(Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8)))
    trainer = Trainer(backbone, cfg, [photo])
    list(trainer.run())
    state = trainer.state_dict()
    with_state = save_concept(trainer.concept(), tmp_path / "with.safetensors", training_state=state)
    without = save_concept(trainer.concept(), tmp_path / "without.safetensors")

    assert read_training_state(without) is None
    carried = read_training_state(with_state)
    assert carried["step"] == 2 and carried["run"] == state["run"]
    for key, value in state["mapper"].items():
        assert torch.equal(carried["mapper"][key], value)
    assert carried["python_random"] == state["python_random"]
    a, b = load_concept(with_state, backbone), load_concept(without, backbone)
    for key, value in a.mapper.state_dict().items():
        assert torch.equal(value, b.mapper.state_dict()[key])
    assert with_state.stat().st_size > without.stat().st_size
    from safetensors import safe_open

    with safe_open(str(with_state), "pt") as handle:
        names = list(handle.keys())
    assert not [n for n in names if n.startswith("training.mapper.")], "the weights are stored once"
    assert [n for n in names if n.startswith("training.optimizer.")], "the optimiser moments are stored"
