"""The launched studio through gradio_client: each Client is one browser session."""
from __future__ import annotations

import contextlib
import re

import pytest
from gradio_client import Client, handle_file

TIMEOUT = 300


def _client(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False)


def _train_args(steps: int, seed: int, preview_every: int = 2) -> list:
    # steps, lr, batch, seed, train band, te weight, te target, preview every, cgdr weight, live band, balance
    return [steps, 3e-3, 1, seed, 200, 900, 1e-3, 0.5, preview_every, 0.0, 400, 800, 1.0]


def _step_of(status: str) -> int | None:
    match = re.search(r"step (\d+) / (\d+)", status or "")
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def _client_with_photo(url: str, photo: str):
    """One browser session that has uploaded ``photo``; closed afterwards."""
    client = _client(url)
    try:
        client.predict([handle_file(photo)], api_name="/photos")
        yield client
    finally:
        client.close()


def _session_of(demo, before: set[str]) -> str:
    new = set(demo.sessions.sessions()) - before
    assert len(new) == 1, f"expected one new session, got {new}"
    return new.pop()


@pytest.fixture
def photo(faces_dir):
    return str(faces_dir / "single" / "f2d_2.jpg")


def test_training_streams_increasing_steps_and_preview_images(studio_app, photo):
    demo, url = studio_app
    client = _client(url)
    try:
        crops, report, *_ = client.predict([handle_file(photo)], api_name="/photos")
        assert len(crops) == 1 and "usable" in report
        job = client.submit(*_train_args(steps=6, seed=0), api_name="/train")
        steps, galleries = [], []
        for status, _plot, gallery, *_buttons in job:
            if _step_of(status) is not None:
                steps.append(_step_of(status))
            if isinstance(gallery, list) and gallery:  # not a skip ({"__type__": "update"}: unchanged)
                galleries.append(gallery)
        final_status = job.outputs()[-1][0]
        assert "Finished" in final_status
        assert steps == sorted(steps) and steps[-1] == 6 and len(set(steps)) >= 2
        assert galleries, "preview images arrived while training"
        assert all(item["image"] for item in galleries[-1])
    finally:
        client.close()


def test_stop_ends_the_stream_and_reports_the_true_final_state(studio_app, photo):
    demo, url = studio_app
    before = set(demo.sessions.sessions())
    with _client_with_photo(url, photo) as client:
        engine = demo.sessions.get(_session_of(demo, before))
        job = client.submit(*_train_args(steps=2000, seed=0, preview_every=0), api_name="/train")
        engine.wait_until(lambda s: s.step >= 2, timeout=TIMEOUT)
        status = client.predict(api_name="/stop")
        assert "Stopped" in status
        stopped_at = _step_of(status)
        assert stopped_at is not None and 2 <= stopped_at < 2000
        assert engine.snapshot().step == stopped_at
        assert not engine.snapshot().active
        job.result(timeout=TIMEOUT)  # the training stream ends by itself (Stop does not cancel it) ...
        assert "Stopped" in job.outputs()[-1][0]  # ... and its last frame is the true end


def test_continue_training_adds_steps_to_the_last_run(studio_app, photo):
    _demo, url = studio_app
    with _client_with_photo(url, photo) as client:
        with pytest.raises(Exception, match="no training to continue"):
            client.predict(2, 400, 800, 1.0, api_name="/continue")
        assert "Finished" in client.predict(*_train_args(steps=3, seed=0, preview_every=0), api_name="/train")[0]
        job = client.submit(2, 400, 800, 1.0, api_name="/continue")
        steps = [_step_of(status) for status, *_ in job if _step_of(status) is not None]
        final_status = job.outputs()[-1][0]
        assert "Finished" in final_status and _step_of(final_status) == 5 and "step 5 / 5" in final_status
        assert steps == sorted(steps) and min(steps) >= 3


def test_two_clients_train_concurrently_with_their_own_state_and_close_frees_them(studio_app, faces_dir):
    demo, url = studio_app
    before = set(demo.sessions.sessions())
    first, second = _client(url), _client(url)
    first.predict([handle_file(str(faces_dir / "single" / "f2d_3.jpg"))], api_name="/photos")
    second.predict([handle_file(str(faces_dir / "single" / "f2d_4.jpg"))], api_name="/photos")
    sessions = set(demo.sessions.sessions()) - before
    assert len(sessions) == 2
    job_a = first.submit(*_train_args(steps=8, seed=11, preview_every=0), api_name="/train")
    job_b = second.submit(*_train_args(steps=8, seed=12, preview_every=0), api_name="/train")
    status_a = job_a.result(timeout=TIMEOUT)[0]
    status_b = job_b.result(timeout=TIMEOUT)[0]
    assert "Finished" in status_a and "Finished" in status_b
    engines = [demo.sessions.get(s) for s in sessions]
    finals = [e.snapshot() for e in engines]
    assert finals[0].concept.uid != finals[1].concept.uid
    assert [p.loss for p in finals[0].losses] != [p.loss for p in finals[1].losses]
    assert {f.prepared.photos[0].name for f in finals} == {"f2d_3.jpg", "f2d_4.jpg"}

    first.close()
    second.close()
    assert demo.sessions.wait_until(lambda alive: not (sessions & set(alive)), timeout=60), "unload freed both engines"
    assert all(e.closed for e in engines)


def test_bad_inputs_give_messages_and_the_session_stays_usable(studio_app, photo, tmp_path):
    demo, url = studio_app
    client = _client(url)
    try:
        text = tmp_path / "notes.jpg"
        text.write_text("not a photo")
        _crops, report, *_ = client.predict([handle_file(str(text))], api_name="/photos")
        assert "✗" in report and "image" in report.lower()

        bad = tmp_path / "concept.safetensors"
        bad.write_bytes(b"garbage that is not a concept file")
        message, *_ = client.predict(handle_file(str(bad)), api_name="/import")
        assert message.startswith("✗")

        crops, report, *_ = client.predict([handle_file(photo)], api_name="/photos")
        assert len(crops) == 1
        emptied = _train_args(steps=2, seed=0, preview_every=0)
        emptied[1] = emptied[4] = None  # learning rate and training band start cleared in the page
        with pytest.raises(Exception, match="Fill in Learning rate, Training band start t"):
            client.predict(*emptied, api_name="/train")
        status = client.predict(*_train_args(steps=2, seed=0, preview_every=0), api_name="/train")[0]
        assert "Finished" in status
        with pytest.raises(Exception, match="Fill in a seed"):
            client.predict("a photo of {}", "", None, 2, 5.0, "ddim", 1, 400, 800, 1.0, api_name="/generate")
        with pytest.raises(Exception, match=re.escape("The prompt has no {} for the person")):  # the engine's refusal
            client.predict("a photo of a cat", "", 0, 2, 5.0, "ddim", 1, 400, 800, 1.0, api_name="/generate")
    finally:
        client.close()


def test_a_real_preset_without_weights_fails_plainly_and_switching_back_works(studio_app, photo):
    _demo, url = studio_app
    with _client_with_photo(url, photo) as client:
        banner, source, *_ = client.predict("sd15", api_name="/preset")
        assert source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        status = client.predict(*_train_args(steps=2, seed=0, preview_every=0), api_name="/train")[0]
        assert "Failed" in status and "stable-diffusion-v1-5/stable-diffusion-v1-5" in status
        assert "hf download" in status

        client.predict("tiny", api_name="/preset")
        status = client.predict(*_train_args(steps=2, seed=0, preview_every=0), api_name="/train")[0]
        assert "Finished" in status


def test_the_class_guided_regularization_slider_reaches_the_trained_concept(studio_app, photo):
    from studio.concept_file import load_concept

    with _client_with_photo(studio_app[1], photo) as client:
        args = _train_args(steps=2, seed=0, preview_every=0)
        args[9] = 0.5  # the Advanced settings slider
        assert "Finished" in client.predict(*args, api_name="/train")[0]
        path, _message = client.predict(api_name="/export")
        assert load_concept(path).config["train"]["cgdr_weight"] == 0.5


def test_a_style_lora_and_an_export_bundle_go_through_the_launched_app_and_stay_with_the_session(studio_app, photo, backbone,
                                                                                                  tmp_path):
    from safetensors.torch import save_file
    from test_lora import kohya_lora

    demo, url = studio_app
    style = tmp_path / "ink.safetensors"
    save_file(kohya_lora(backbone), str(style))
    before = set(demo.sessions.sessions())
    with _client_with_photo(url, photo) as client:
        session = _session_of(demo, before)
        message = client.predict([handle_file(str(style))], 0.7, 1.0, 1.0, 1.0, api_name="/loras")
        assert message.startswith("✓ ") and "× 0.7" in message
        assert any(p.name == "ink.safetensors" for p in demo.sessions._files[session])  # the upload is the session's
        client.predict(*_train_args(steps=2, seed=3, preview_every=0), api_name="/train")
        bundle, note = client.predict("my-face", 2, "all", "a photo of {}", "dpmsolver++", 4, 0, 400, 800,
                                      api_name="/export_tools")
        assert "A1111" in note and bundle.endswith(".zip")

