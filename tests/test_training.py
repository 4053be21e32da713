"""One training path (studio/training.py): TrainingRun builds or resumes a trainer, drives a local or
chunked source, keeps where it ended and says when a stop lands; GenerationSettings.from_config."""
from __future__ import annotations

import pytest
import torch

from studio.events import TrainingFinished, TrainingStep
from studio.runner import training_chunk
from studio.sampler import GenerationSettings
from studio.trainer import StateMismatch, TrainingPhoto
from studio.training import TrainingRun


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return tiny_cfg.replace(**{"train.steps": 4, "train.preview_every": 0, "train.seed": 3})


@pytest.fixture(scope="module")
def photos(training_photos):
    return training_photos


def test_a_local_run_trains_to_the_end_and_keeps_where_it_ended(backbone, cfg, photos):
    run = TrainingRun(backbone, cfg, photos)
    events = list(run.events())
    assert [e.step for e in events if isinstance(e, TrainingStep)] == [1, 2, 3, 4]
    assert isinstance(events[-1], TrainingFinished) and events[-1].concept.steps_done == 4
    ended = run.ended()
    assert ended.step == 4 and ended.cfg is cfg
    assert all(t.device.type == "cpu" for t in ended.state["mapper"].values() if isinstance(t, torch.Tensor))


def test_training_more_from_an_ended_run_equals_asking_for_more_steps_at_first(backbone, cfg, photos):
    halfway = TrainingRun(backbone, cfg.replace(**{"train.steps": 2}), photos)
    list(halfway.events())
    more = halfway.ended().continued(2, photos)
    assert more.train.steps == 4
    resumed = TrainingRun(backbone, more, photos, state=halfway.ended().state)
    list(resumed.events())
    straight = TrainingRun(backbone, cfg, photos)
    list(straight.events())
    for key, value in straight.end_state()["mapper"].items():
        assert torch.equal(value, resumed.end_state()["mapper"][key]), key


def test_an_ended_run_refuses_other_photos(backbone, cfg, photos):
    run = TrainingRun(backbone, cfg.replace(**{"train.steps": 1}), photos)
    list(run.events())
    flipped = [TrainingPhoto(photo.image.transpose(0), photo.mask) for photo in photos]
    with pytest.raises(StateMismatch, match="other photos"):
        run.ended().continued(1, flipped)


def test_a_stop_lands_after_the_step_locally_and_at_the_chunk_end_in_chunks(backbone, cfg, photos, monkeypatch):
    monkeypatch.setenv("STUDIO_CHUNK_STEPS", "2")
    stop = {"asked": False}
    local = TrainingRun(backbone, cfg, photos, stop_requested=lambda: stop["asked"])
    chunked = TrainingRun(backbone, cfg, photos, gpu_call=training_chunk, stop_requested=lambda: stop["asked"])
    assert not local.stop_lands_now() and not chunked.stop_lands_now()
    stop["asked"] = True
    assert local.stop_lands_now()
    assert not chunked.stop_lands_now(), "a chunk's weights only come back when it ends"
    events = list(chunked.events())  # the chunk source itself ends after the first chunk
    assert [e.step for e in events if isinstance(e, TrainingStep)] == [1, 2] and chunked.step == 2
    ended = chunked.stopped_event()
    assert ended.stopped and ended.step == chunked.step and chunked.ended().step == chunked.step


def test_generation_settings_come_from_the_preset_and_none_keeps_its_value(tiny_cfg):
    sample = tiny_cfg.sample
    settings = GenerationSettings.from_config(tiny_cfg, guidance_scale=None, num_inference_steps=3)
    assert settings.num_inference_steps == 3 and settings.guidance_scale == sample.guidance_scale
    assert settings.band == tuple(sample.band) and settings.balance_layers == sample.balance_layers
    assert settings.height == settings.width == tiny_cfg.image_size
    preview = GenerationSettings.from_config(tiny_cfg, preview=True)
    assert preview.num_inference_steps == sample.preview_steps and preview.seeds == list(sample.preview_seeds)
    assert GenerationSettings.from_config(sample.__class__(resolution=0)).height is None, "0: the backbone's native size"
    assert set(settings.kwargs()) == {f for f in GenerationSettings.__dataclass_fields__}
