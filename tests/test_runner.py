"""The ZeroGPU path: training in chunks of GPU calls gives the same result as one run.

A ZeroGPU call runs in a forked process and pickles its arguments and results; ``pickled``
below does the same round trip, so anything that would not survive it fails here.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from studio.engine import Engine, Phase
from studio.events import PreviewReady, TrainingFinished, TrainingStep
from studio.runner import chunked_events, training_chunk
from studio.trainer import Trainer, TrainingPhoto

TIMEOUT = 300


def pickled(fn):
    """Wrap ``fn`` (a generator function) like a ZeroGPU call: pickle in, pickle each item out."""

    def call(*args):
        args = pickle.loads(pickle.dumps(args))
        for item in fn(*args):
            yield pickle.loads(pickle.dumps(item))

    return call


@pytest.fixture(scope="module")
def chunk_cfg(tiny_cfg):
    return tiny_cfg.replace(**{"train.steps": 7, "train.preview_every": 3, "train.seed": 5})


@pytest.fixture(scope="module")
def photos(training_photos):
    return training_photos


def test_chunks_of_gpu_calls_equal_one_uninterrupted_run(chunk_cfg, photos, backbone):
    events = list(
        chunked_events(
            pickled(training_chunk), chunk_cfg.to_dict(), photos, chunk_cfg.train.steps,
            preview=lambda: ((400, 800), 1.0), stopped=lambda: False, chunk_steps=3,
        )
    )
    steps = [e.step for e in events if isinstance(e, TrainingStep)]
    previews = [e.step for e in events if isinstance(e, PreviewReady)]
    assert steps == list(range(1, 8))
    assert previews == [0, 3, 6, 7], "one per due step and a last one, none repeated at chunk boundaries"
    assert isinstance(events[-1], TrainingFinished)

    reference = Trainer(backbone, chunk_cfg, photos)
    for _ in range(chunk_cfg.train.steps):
        reference.train_step()
    chunked = events[-1].concept.mapper.state_dict()
    for name, tensor in reference.mapper.state_dict().items():
        assert torch.equal(tensor, chunked[name]), name


def test_engine_in_foreground_mode_drives_chunks_and_can_stop_between_them(chunk_cfg, faces_dir):
    cfg = chunk_cfg.replace(**{"train.steps": 200, "train.preview_every": 0})
    engine = Engine(cfg, session_id="zerogpu-test")
    try:
        engine.prepare_photos([str(faces_dir / "single" / "f2d_0.jpg")])
        seen = []
        for snapshot in engine.start(foreground=True, gpu_call=pickled(training_chunk)):
            seen.append(snapshot.step)
            if snapshot.step >= 2:
                engine.stop()
        final = engine.snapshot()
        assert final.phase is Phase.STOPPED
        assert 2 <= final.step < 200
        assert final.concept is not None and final.concept.steps_done == final.step
        assert seen == sorted(seen)
    finally:
        engine.close()


def test_engine_in_foreground_mode_finishes_with_a_concept(chunk_cfg, faces_dir):
    engine = Engine(chunk_cfg, session_id="zerogpu-finish")
    try:
        engine.prepare_photos([str(faces_dir / "single" / "f2d_1.jpg")])
        snapshots = list(engine.start(foreground=True, gpu_call=pickled(training_chunk)))
        assert snapshots[-1].phase is Phase.FINISHED
        assert [p.step for p in snapshots[-1].losses] == list(range(1, 8))
        assert snapshots[-1].concept.steps_done == 7
        assert snapshots[-1].preview is not None
    finally:
        engine.close()


def test_engine_in_foreground_mode_continues_a_run_in_chunks(chunk_cfg, faces_dir, backbone):
    """On ZeroGPU the state that comes back from the last chunk is what a continue starts from."""
    engine = Engine(chunk_cfg.replace(**{"train.steps": 4}), session_id="zerogpu-continue")
    try:
        engine.prepare_photos([str(faces_dir / "single" / "f2d_0.jpg")])
        list(engine.start(foreground=True, gpu_call=pickled(training_chunk)))
        snapshots = list(engine.continue_training(3, foreground=True, gpu_call=pickled(training_chunk)))
        final = snapshots[-1]
        assert final.phase is Phase.FINISHED and final.concept.steps_done == 7
        assert [p.step for p in final.losses] == list(range(1, 8))
        reference = Trainer(backbone, chunk_cfg, [TrainingPhoto.from_prepared(p) for p in engine.snapshot().prepared.photos])
        for _ in range(7):
            reference.train_step()
        continued = final.concept.mapper.state_dict()
        for name, tensor in reference.mapper.state_dict().items():
            assert torch.equal(tensor, continued[name]), name
    finally:
        engine.close()


def test_the_zerogpu_train_handler_streams_a_chunked_training_in_the_launched_app(monkeypatch, faces_dir, tmp_path):
    """The sync-generator handler that drives GPU chunks on ZeroGPU, here without ZeroGPU itself."""
    import socket

    from gradio_client import Client, handle_file

    import app

    monkeypatch.setenv("STUDIO_CHUNKED_TRAINING", "1")
    monkeypatch.setenv("STUDIO_CHUNK_STEPS", "2")
    # A second launched app keeps its files apart: Gradio names cached files by content, and a
    # launched app deletes the ones it made when it closes, the sample photos' copies among them,
    # which the session's studio (conftest.studio_app) goes on handing to its visitors.
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app.create_demo("tiny")
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(demo.local_url, verbose=False, analytics_enabled=False)
    try:
        client.predict([handle_file(str(faces_dir / "single" / "f2d_0.jpg"))], api_name="/photos")
        job = client.submit(5, 3e-3, 1, 0, 200, 900, 1e-3, 0.5, 0, 0.0, 400, 800, 1.0, api_name="/train")
        statuses = [status for status, _plot, _gallery in job]
        assert "Finished" in job.outputs()[-1][0] and "step 5 / 5" in job.outputs()[-1][0]
        assert len(statuses) >= 2
        engine = demo.sessions.get(demo.sessions.sessions()[0])
        assert engine._thread is None, "no background thread: the request drove the training"
        assert [p.step for p in engine.snapshot().losses] == [1, 2, 3, 4, 5]

        # Train more goes through the same request-driven chunks.
        job = client.submit(3, 400, 800, 1.0, api_name="/continue")
        list(job)
        assert "Finished" in job.outputs()[-1][0] and "step 8 / 8" in job.outputs()[-1][0]
        assert engine._thread is None
        assert [p.step for p in engine.snapshot().losses] == list(range(1, 9))
    finally:
        client.close()
        demo.sessions.close_all()
        demo.close()
