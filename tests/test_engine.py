"""The per-session engine: background training, commands, snapshots, sessions side by side."""
from __future__ import annotations

import threading

import pytest
import torch

from studio.engine import Engine, EngineClosed, Phase
from studio.ui import views

TIMEOUT = 300


@pytest.fixture(scope="module")
def engine_cfg(tiny_cfg):
    return tiny_cfg.replace(**{"train.steps": 6, "train.preview_every": 3})


@pytest.fixture(scope="module")
def face_photo(faces_dir):
    return str(faces_dir / "single" / "f2d_0.jpg")


@pytest.fixture
def engine(engine_cfg, face_photo, backbone):
    engine = Engine(engine_cfg, session_id=f"test-{threading.get_ident()}-{id(engine_cfg)}")
    engine.prepare_photos([face_photo])
    yield engine
    engine.close()


def _long_run(engine_cfg, face_photo, session_id: str, steps: int = 500) -> Engine:
    """A session already training a long run without previews (stop or close it)."""
    engine = Engine(engine_cfg.replace(**{"train.steps": steps, "train.preview_every": 0}), session_id=session_id)
    engine.prepare_photos([face_photo])
    engine.start()
    return engine


def _mapper_weights(concept) -> list[torch.Tensor]:
    return [p.detach().clone() for p in concept.mapper.parameters()]


def test_training_runs_in_the_background_and_streams_steps_previews_and_a_concept(engine):
    seen_steps: list[int] = []
    engine.start()
    version = -1
    while True:
        snapshot = engine.wait_for_change(version, timeout=TIMEOUT)
        version = snapshot.version
        seen_steps.append(snapshot.step)
        if not snapshot.active:
            break
    assert snapshot.phase is Phase.FINISHED
    assert [p.step for p in snapshot.losses] == list(range(1, 7))
    assert seen_steps == sorted(seen_steps), "steps only go forward"
    assert snapshot.preview is not None and snapshot.preview.step == 6
    assert len(snapshot.preview.images) == len(engine.cfg.sample.preview_prompts) * len(engine.cfg.sample.preview_seeds)
    assert snapshot.concept is not None and snapshot.concept.steps_done == 6
    assert snapshot.is_random_backbone and "tiny" in snapshot.backbone


def test_pause_holds_the_step_and_resume_continues_to_the_end(engine_cfg, face_photo):
    engine = Engine(engine_cfg.replace(**{"train.steps": 40, "train.preview_every": 0}), session_id="pause-test")
    try:
        engine.prepare_photos([face_photo])
        engine.start()
        engine.wait_until(lambda s: s.step >= 2, timeout=TIMEOUT)
        engine.pause()
        paused = engine.wait_until(lambda s: s.phase is Phase.PAUSED, timeout=TIMEOUT)
        # nothing published yet, but the live weights can be previewed, and the page offers it
        assert paused.concept is None and paused.live_weights and views.controls(paused)["preview"]
        # a step already inside the gate may still land; taking the gate ourselves waits it out
        engine.render_previews()
        held = engine.snapshot().step
        engine.render_previews()
        assert engine.snapshot().step == held
        assert paused.phase is Phase.PAUSED
        engine.resume()
        done = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done.phase is Phase.FINISHED and done.step == 40
    finally:
        engine.close()


def test_stop_takes_effect_within_a_step_and_keeps_the_concept(engine_cfg, face_photo):
    engine = _long_run(engine_cfg, face_photo, "stop-test")
    try:
        at = engine.wait_until(lambda s: s.step >= 3, timeout=TIMEOUT).step
        engine.stop()
        final = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert final.phase is Phase.STOPPED
        assert at <= final.step <= at + 2, "stop lands within the step in flight"
        assert final.concept is not None and final.concept.steps_done == final.step
    finally:
        engine.close()


def test_two_sessions_train_at_once_without_seeing_each_other(engine_cfg, face_photo, faces_dir):
    a = Engine(engine_cfg.replace(**{"train.seed": 1, "train.preview_every": 0}), session_id="session-a")
    b = Engine(engine_cfg.replace(**{"train.seed": 2, "train.preview_every": 0}), session_id="session-b")
    try:
        a.prepare_photos([face_photo])
        b.prepare_photos([str(faces_dir / "single" / "f2d_1.jpg")])
        a.start()
        b.start()
        done_a = a.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        done_b = b.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done_a.phase is done_b.phase is Phase.FINISHED
        assert done_a.concept.uid != done_b.concept.uid
        assert [p.loss for p in done_a.losses] != [p.loss for p in done_b.losses]
        weights_a, weights_b = _mapper_weights(done_a.concept), _mapper_weights(done_b.concept)
        assert any(not torch.equal(x, y) for x, y in zip(weights_a, weights_b))
        assert done_a.prepared.photos[0].name != done_b.prepared.photos[0].name
    finally:
        a.close()
        b.close()


def test_bad_photos_and_bad_commands_leave_the_session_usable(engine, tmp_path):
    from studio.faces import PhotoError

    before = engine.snapshot().prepared
    not_an_image = tmp_path / "selfie.jpg"
    not_an_image.write_text("this is not a picture")
    with pytest.raises(PhotoError):
        engine.prepare_photos([str(not_an_image)])
    assert engine.snapshot().prepared is before, "the previous photos stay"

    fresh = Engine(engine.cfg, session_id="no-photos")
    with pytest.raises(ValueError, match="photo"):
        fresh.start()
    fresh.close()

    with pytest.raises(ValueError, match="concept"):
        engine.generate("a photo of {}")

    bad_concept = tmp_path / "concept.safetensors"
    bad_concept.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    with pytest.raises(ValueError):
        engine.import_concept(str(bad_concept))
    assert engine.snapshot().concept is None

    engine.start()
    done = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    assert done.phase is Phase.FINISHED


def test_export_then_import_in_a_fresh_session_generates_the_same_image(engine, engine_cfg, tmp_path):
    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    path = engine.export_concept(tmp_path / "me.safetensors")
    here = engine.generate("a photo of {} in a garden", seeds=[3], num_inference_steps=3)

    other = Engine(engine_cfg, session_id="import-test")
    try:
        from studio.ui.views import status_markdown

        assert status_markdown(other.snapshot()).startswith("**Idle**")
        other.import_concept(str(path))
        status = status_markdown(other.snapshot())
        assert status.startswith("**Ready**") and "Imported a concept trained for" in status
        there = other.generate("a photo of {} in a garden", seeds=[3], num_inference_steps=3)
        assert list(here.images[0].getdata()) == list(there.images[0].getdata())
    finally:
        other.close()


def test_continue_training_equals_asking_for_more_steps_at_first(engine_cfg, face_photo, faces_dir):
    """Finish 3 steps, continue 3 more: the same weights and losses as one 6-step run, the loss
    curve goes on from step 4; new photos, a switched model or nothing to continue are refused."""
    straight = Engine(engine_cfg.replace(**{"train.steps": 6}), session_id="continue-straight")
    split = Engine(engine_cfg.replace(**{"train.steps": 3}), session_id="continue-split")
    try:
        for engine in (straight, split):
            engine.prepare_photos([face_photo])
        with pytest.raises(ValueError, match="no training to continue"):
            split.continue_training(3)
        straight.start()
        whole = straight.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        split.start()
        split.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        split.continue_training(3)
        assert "Continuing from step 3 to 6" in split.snapshot().message
        done = split.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done.phase is Phase.FINISHED and done.step == 6 and done.concept.steps_done == 6
        assert done.message == "Finished 6 steps. Train more goes on from here."
        assert [p.step for p in done.losses] == list(range(1, 7))
        assert [p.loss for p in done.losses] == [p.loss for p in whole.losses]
        for a, b in zip(_mapper_weights(whole.concept), _mapper_weights(done.concept)):
            assert torch.equal(a, b)

        with pytest.raises(ValueError, match="at least one step"):
            split.continue_training(0)
        split.prepare_photos([str(faces_dir / "single" / "f2d_1.jpg")])
        with pytest.raises(ValueError, match="photos changed since the last training"):
            split.continue_training(2)
        split.prepare_photos([face_photo])
        split.configure(split.cfg.replace(**{"model.image_encoder": None}))
        with pytest.raises(ValueError, match="no training to continue"):
            split.continue_training(2)
        assert split.snapshot().concept.steps_done == 6, "a refused continue changes nothing"
    finally:
        straight.close()
        split.close()


def test_an_exported_concept_carries_its_training_to_another_session(engine_cfg, face_photo, faces_dir, tmp_path):
    """Export after 3 steps, import in a fresh session with the same photo, continue 3 more:
    the same weights as one 6-step run. With other photos the import works, continuing does not."""
    straight = Engine(engine_cfg.replace(**{"train.steps": 6, "train.preview_every": 0}), session_id="carry-straight")
    first = Engine(engine_cfg.replace(**{"train.steps": 3, "train.preview_every": 0}), session_id="carry-first")
    second = Engine(engine_cfg, session_id="carry-second")
    try:
        for engine in (straight, first):
            engine.prepare_photos([face_photo])
            engine.start()
            engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        path = first.export_concept(tmp_path / "three-steps.safetensors")

        second.prepare_photos([str(faces_dir / "single" / "f2d_1.jpg")])
        second.import_concept(str(path))
        assert "add the same photos and press Train more" in second.snapshot().message
        assert second.snapshot().step == 3
        with pytest.raises(ValueError, match="photos changed"):
            second.continue_training(3)
        second.prepare_photos([face_photo])
        second.continue_training(3)
        done = second.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done.phase is Phase.FINISHED and done.concept.steps_done == 6
        assert [p.step for p in done.losses] == [4, 5, 6]
        whole = straight.snapshot()
        assert [p.loss for p in done.losses] == [p.loss for p in whole.losses][3:]
        for a, b in zip(_mapper_weights(whole.concept), _mapper_weights(done.concept)):
            assert torch.equal(a, b)
        # A damaged training state loses only the continuation, never the concept.
        import json

        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        del tensors[next(name for name in tensors if name.startswith("training."))]
        broken = tmp_path / "broken-state.safetensors"
        save_file(tensors, str(broken), metadata=header["__metadata__"])
        second.import_concept(str(broken))
        assert second.snapshot().concept.steps_done == 3
        assert "training state is unusable" in second.snapshot().message
        with pytest.raises(ValueError, match="no training to continue"):
            second.continue_training(1)
    finally:
        for engine in (straight, first, second):
            engine.close()


def test_a_stopped_run_continues_from_where_it_stopped(engine_cfg, face_photo):
    engine = _long_run(engine_cfg, face_photo, "continue-stopped")
    try:
        engine.wait_until(lambda s: s.step >= 2, timeout=TIMEOUT)
        engine.stop()
        stopped = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert stopped.phase is Phase.STOPPED
        engine.continue_training(2)
        done = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
        assert done.phase is Phase.FINISHED and done.step == stopped.step + 2
        assert [p.step for p in done.losses] == list(range(1, stopped.step + 3))
    finally:
        engine.close()


def test_close_is_idempotent_joins_the_thread_and_refuses_new_work(engine_cfg, face_photo):
    engine = _long_run(engine_cfg, face_photo, "close-test", steps=1000)
    engine.wait_until(lambda s: s.step >= 1, timeout=TIMEOUT)
    thread = engine._thread
    engine.close()
    engine.close()
    assert not thread.is_alive()
    assert engine.snapshot().phase is Phase.CLOSED
    with pytest.raises(EngineClosed):
        engine.start()


def test_previews_and_generations_carry_scores_and_the_best_step_is_marked(engine):
    engine.start()
    done = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    scores = done.preview.scores
    assert len(scores) == len(done.preview.images)
    assert all(not s.identity.face_found and s.identity.similarity is None for s in scores), "noise has no face"
    assert all(s.prompt.model for s in scores)
    assert done.best_step in (0, 3, 6) and f"step {done.best_step}" in done.best_note

    result = engine.generate("a photo of {} smiling", seeds=[1], num_inference_steps=2)
    # the scores lead the caption (a gallery cuts a long one short), then the prompt and seed
    assert result.captions[0].startswith("no face · prompt ") and result.captions[0].endswith("a photo of {} smiling (seed 1)")
    [(_, preview_caption), *_] = views.preview_items(done)
    assert preview_caption.startswith("no face · prompt ") and f"step {done.preview.step} · " in preview_caption


def test_a_sweep_yields_one_point_per_setting_and_can_be_cancelled(engine):
    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    points = list(engine.sweep(["a photo of {}"], [0], [(400, 800), (200, 900)], [0.5, 2.0], steps=2))
    assert [(p.band, p.balance) for p in points] == [((400, 800), 0.5), ((400, 800), 2.0), ((200, 900), 0.5), ((200, 900), 2.0)]

    partial = []
    for point in engine.sweep(["a photo of {}"], [0], [(400, 800), (200, 900)], [0.5, 2.0], steps=2):
        partial.append(point)
        engine.cancel_sweep()
    assert len(partial) == 1
    assert len(list(engine.sweep(["a photo of {}"], [0], [(400, 800)], [1.0], steps=2))) == 1, "usable afterwards"


def test_a_sweep_is_published_as_immutable_snapshots_from_running_to_its_end(engine):
    from studio.errors import SessionBusy

    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    assert engine.snapshot().sweep is None
    points = engine.sweep(["a photo of {}"], [0, 1], [(400, 800)], [0.5, 2.0], steps=2)
    running = engine.snapshot().sweep
    assert running.state == "running" and running.points == () and running.total == 2
    assert running.images_per_setting == 2 and running.steps == 2
    with pytest.raises(SessionBusy, match="already running"):
        engine.sweep(["a photo of {}"], [0], [(400, 800)], [1.0], steps=2)
    first = next(points)
    after_one = engine.snapshot().sweep
    assert after_one.points == (first,) and after_one.state == "running"
    assert running.points == (), "an older snapshot never changes"
    rest = list(points)
    done = engine.snapshot().sweep
    assert done.state == "done" and done.points == (first, *rest) and done.finished_at is not None
    assert done.uid == running.uid

    stopped = engine.sweep(["a photo of {}"], [0], [(400, 800), (200, 900)], [1.0], steps=2)
    next(stopped)
    engine.cancel_sweep()
    assert list(stopped) == []
    assert engine.snapshot().sweep.state == "stopped" and len(engine.snapshot().sweep.points) == 1


def test_a_sweep_closed_before_its_first_point_ends_as_stopped(engine):
    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    engine.sweep(["a photo of {}"], [0], [(400, 800)], [1.0], steps=2).close()
    assert engine.snapshot().sweep.state == "stopped"
    assert len(list(engine.sweep(["a photo of {}"], [0], [(400, 800)], [1.0], steps=2))) == 1, "a new one may start"


def test_a_session_waiting_for_the_accelerator_shows_its_place_in_line(engine):
    from studio.gate import GATE
    from studio.ui.views import status_markdown

    with GATE.hold("another-session"):
        engine.start()
        assert GATE.wait_until_queued(engine.session_id, timeout=TIMEOUT)
        waiting = engine.snapshot()
        assert waiting.queue_position == 1
        assert "1 ahead in line" in status_markdown(waiting)
        assert waiting.step == 0
    done = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    assert done.phase is Phase.FINISHED and done.queue_position is None


def test_an_interrupt_while_waiting_in_line_ends_a_generation_or_composition_after_0_steps(engine):
    from studio.compose import PersonSource
    from studio.gate import GATE
    from studio.sampler import GenerationInterrupted

    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    calls = {
        "generate": lambda: engine.generate("a photo of {}", seeds=[0], num_inference_steps=3),
        "compose": lambda: engine.compose([PersonSource("session")], "a photo of {0}", seeds=[0], num_inference_steps=3),
    }
    for name, call in calls.items():
        raised: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                raised.append(exc)

        with GATE.hold("another-session"):  # the accelerator is busy: this session waits in line
            thread = threading.Thread(target=run)
            thread.start()
            assert GATE.wait_until_queued(engine.session_id, timeout=TIMEOUT)
            {"generate": engine.interrupt_generation, "compose": engine.interrupt_composition}[name]()
            thread.join(TIMEOUT)
        assert len(raised) == 1 and isinstance(raised[0], GenerationInterrupted), (name, raised)
        assert (raised[0].step, raised[0].total) == (0, 3), name
    assert len(engine.generate("a photo of {}", seeds=[0], num_inference_steps=2).images) == 1  # the next one runs


def test_the_interrupt_of_one_kind_of_run_leaves_the_other_kind_running(engine):
    """Create images and Compose have their own Interrupt: each stops only its own run."""
    from studio.compose import PersonSource
    from studio.gate import GATE

    engine.start()
    engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    runs = {
        "generate": (lambda: engine.generate("a photo of {}", seeds=[0], num_inference_steps=2),
                     engine.interrupt_composition),
        "compose": (lambda: engine.compose([PersonSource("session")], "a photo of {0}", seeds=[0], num_inference_steps=2),
                    engine.interrupt_generation),
    }
    for name, (call, other_interrupt) in runs.items():
        outcome: list = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                outcome.append(exc)

        with GATE.hold("another-session"):  # this session's run waits in line while the other Interrupt comes
            thread = threading.Thread(target=run)
            thread.start()
            assert GATE.wait_until_queued(engine.session_id, timeout=TIMEOUT)
            other_interrupt()
        thread.join(TIMEOUT)
        assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), (name, outcome)


def test_asking_for_images_without_a_concept_fails_at_once_with_what_it_was_for(engine_cfg):
    from studio.engine import NoConceptYet

    fresh = Engine(engine_cfg, session_id="no-concept")
    try:
        with pytest.raises(NoConceptYet, match="exploring"):
            fresh.sweep(["a photo of {}"], [0], [(400, 800)], [1.0])  # raised by the call, before any next()
        with pytest.raises(NoConceptYet, match="previewing"):
            fresh.render_previews((300, 700), 0.5)
        assert fresh._preview_settings == ((300, 700), 0.5), "the slider values are kept for training previews"
        with pytest.raises(NoConceptYet, match="exporting"):
            fresh.export_concept("unused.safetensors")
    finally:
        fresh.close()


def test_out_of_memory_while_setting_up_gets_the_same_advice_as_during_a_step(engine, monkeypatch):
    """The VAE encode in the trainer's constructor can run out of memory too: one message for both."""
    from studio.trainer import OUT_OF_MEMORY_MESSAGE, Trainer

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(Trainer, "__init__", exhausted)
    engine.start()
    failed = engine.wait_until(lambda s: not s.active, timeout=TIMEOUT)
    assert failed.phase is Phase.FAILED and failed.message == OUT_OF_MEMORY_MESSAGE
