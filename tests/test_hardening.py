"""A server many strangers share: no crash from concurrent photo work, bounded
memory for huge photos and concept files, a NaN rollback that gives up, sessions without a
heartbeat that time out. Crash and memory cases run in a subprocess, so that a SIGSEGV or a
memory blow-up fails the test instead of killing pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


# ----------------------------------------------------------------------------- native models


def test_concurrent_detections_on_faceless_and_face_photos_do_not_crash(faces_dir):
    """The shared dlib models called from several threads at once."""
    result = _run_python(f"""
        import threading, numpy as np
        from PIL import Image
        from studio.config import FaceConfig
        from studio.faces import get_face_analyzer, load_photo, prepare_photo, PhotoError
        cfg = FaceConfig(backend="dlib")
        analyzer = get_face_analyzer(cfg)
        face, _ = load_photo({str(faces_dir / "single" / "f2d_0.jpg")!r}, cfg.max_pixels)
        face = np.ascontiguousarray(np.asarray(face))
        rng = np.random.default_rng(0)
        blank = (rng.random((480, 640, 3)) * 60 + 100).astype(np.uint8)  # faceless: upsampled second pass
        errors, found = [], []
        def work(i):
            try:
                for j in range(6):
                    image = blank if (i + j) % 2 else face
                    faces = analyzer.detect(image)
                    if faces:
                        analyzer.embed(image, faces[0])
                        found.append(1)
                    try:
                        prepare_photo(Image.fromarray(blank), cfg, analyzer)
                    except PhotoError:
                        pass
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert found
        print("OK", len(found))
    """)
    assert result.returncode == 0, f"rc={result.returncode} (negative: killed by a signal)\n{result.stderr[-3000:]}"
    assert "OK" in result.stdout


def test_photo_preparation_is_bounded():
    from studio import faces

    assert faces.MAX_CONCURRENT_PHOTOS <= 4
    assert faces.PREPARE_SLOTS._initial_value == faces.MAX_CONCURRENT_PHOTOS  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- NaN rollback


def test_a_diverging_learning_rate_ends_the_run_with_a_sentence_in_bounded_steps(backbone, tiny_cfg, faces_dir, monkeypatch):
    """Rollbacks separated by good steps used to reset the counter and repeat
    forever. Here every third step diverges: the run gives up after MAX_ROLLBACKS_PER_RUN."""
    import torch
    from PIL import Image

    from studio import trainer as trainer_module
    from studio.events import RolledBack, TrainingFailed, TrainingStep
    from studio.trainer import MAX_ROLLBACKS_PER_RUN, Trainer, TrainingPhoto

    torch.set_num_threads(1)
    photo = TrainingPhoto.center_crop(Image.open(faces_dir / "single" / "f2d_0.jpg"))
    huge = tiny_cfg.replace(**{"train.steps": 10_000, "train.preview_every": 0, "train.lr": 1e30, "train.grad_accum": 1})
    events = []
    for event in Trainer(backbone, huge, [photo]).run():  # a real divergence ends, whatever its pattern
        events.append(event)
        assert len(events) < 200, "the rollbacks did not end"
    assert isinstance(events[-1], TrainingFailed) and "learning rate" in events[-1].message and "1e+30" in events[-1].message

    cfg = huge.replace(**{"train.lr": 1e-3, "train.snapshot_every": 1})
    trainer = Trainer(backbone, cfg, [photo])
    real_micro_step = trainer._micro_step
    calls = {"n": 0}

    def every_third_diverges():  # a good step or two, then a non-finite loss: never 3 in a row
        calls["n"] += 1
        result = real_micro_step()
        if calls["n"] % 3 == 0:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer, "_micro_step", every_third_diverges)
    events = []
    for event in trainer.run():
        events.append(event)
        assert len(events) < 100, "the rollbacks did not end"
    assert isinstance(events[-1], TrainingFailed)
    assert "Training stopped: the loss stopped being a finite number" in events[-1].message
    assert "learning rate is too high: lower it (now 0.001)" in events[-1].message
    assert sum(isinstance(e, RolledBack) for e in events) == MAX_ROLLBACKS_PER_RUN
    assert any(isinstance(e, TrainingStep) for e in events)
    assert trainer_module.MAX_ROLLBACKS_IN_ROW == 3


def test_the_loss_history_is_appended_not_copied():
    from studio.engine import LossHistory, LossPoint

    history = LossHistory()
    snapshots = []
    for step in range(1, 2001):
        history = history.appended(LossPoint(step, 1.0 / step, 0.0, 0.0))
        snapshots.append(history)
    assert all(s._points is history._points for s in snapshots)  # one list for all
    assert len(snapshots[9]) == 10 and snapshots[9][-1].step == 10 and list(snapshots[2])[-1].step == 3
    assert snapshots[9][:2] == (LossPoint(1, 1.0, 0.0, 0.0), LossPoint(2, 0.5, 0.0, 0.0))
    branch = snapshots[9].appended(LossPoint(99, 0.0, 0.0, 0.0))  # an old snapshot never sees newer points
    assert [p.step for p in branch][-2:] == [10, 99] and len(history) == 2000
    assert LossHistory() == () and not LossHistory()
    with pytest.raises(IndexError):
        snapshots[0][1]


# ----------------------------------------------------------------------------- sessions without a heartbeat


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeatless_session_left_training_is_closed_after_the_idle_timeout(tiny_cfg, faces_dir, backbone):
    """A REST client starts training and goes away; no unload ever comes."""
    from studio.engine import Phase
    from studio.ui.sessions import SessionRegistry

    clock = _Clock()
    registry = SessionRegistry(tiny_cfg.replace(**{"train.steps": 10_000, "train.preview_every": 0}),
                               idle_timeout_s=60, clock=clock)
    left = registry.get("rest-client")
    left.prepare_photos([str(faces_dir / "single" / "f2d_0.jpg")])
    left.start()
    left.wait_until(lambda s: s.step >= 1, timeout=120)
    export = registry.folder("rest-client") / "concept.safetensors"
    export.write_bytes(b"x")
    upload = Path(registry.folder("other")) / "upload.jpg"
    upload.write_bytes(b"y")
    registry.own("rest-client", upload)
    browser = registry.get("browser-tab")
    clock.now += 45
    registry.touch("browser-tab")  # the open tab's keepalive
    assert registry.close_idle() == []
    clock.now += 30  # 75 s since the REST client's last request, 30 s since the tab's ping
    assert registry.close_idle() == ["rest-client"]
    assert left.closed and left.snapshot().phase is Phase.CLOSED
    assert left._thread is None  # its training thread was joined: the work stopped
    assert not export.exists() and not upload.exists()
    assert registry.sessions() == ["browser-tab"] and not browser.closed
    registry.close_all()


def test_the_number_of_engines_is_capped_with_a_plain_message(tiny_cfg):
    from studio.ui.sessions import SessionRegistry, StudioFull

    clock = _Clock()
    registry = SessionRegistry(tiny_cfg, max_engines=2, idle_timeout_s=60, clock=clock)
    registry.get("a"), registry.get("b")
    with pytest.raises(StudioFull, match="The studio is full: 2 people are using it right now. Try again in a few minutes."):
        registry.get("c")
    assert registry.get("a") is registry.get("a")  # existing sessions go on
    registry.close("b")
    registry.get("c")
    clock.now += 61
    registry.get("d")  # idle sessions are closed first: room again
    assert sorted(registry.sessions()) == ["d"]
    registry.close_all()


def test_trainings_at_once_are_capped_with_a_plain_message_and_nothing_lost(tiny_cfg, faces_dir, backbone):
    """Past the server's training limit a new training is refused with a sentence; the refused
    session keeps its photos and its finished run; a slot comes back when a run ends."""
    from studio.engine import Engine, Phase
    from studio.gate import AcceleratorGate, StudioBusy, TrainingSlots

    slots, gate = TrainingSlots(1), AcceleratorGate()
    cfg = tiny_cfg.replace(**{"train.preview_every": 0, "train.steps": 2})
    photo = str(faces_dir / "single" / "f2d_0.jpg")
    first, second = (Engine(cfg, session_id=name, gate=gate, slots=slots) for name in ("first", "second"))
    try:
        for engine in (first, second):
            engine.prepare_photos([photo])
        for _ in second.start(foreground=True):
            pass
        finished = second.snapshot()
        assert finished.phase is Phase.FINISHED and len(slots) == 0
        first.start({"train.steps": 10_000})
        first.wait_until(lambda s: s.step >= 1, timeout=120)
        with pytest.raises(StudioBusy, match="The studio is busy: 1 trainings are running on this server right now"):
            second.start()
        with pytest.raises(StudioBusy):
            second.continue_training(3)
        kept = second.snapshot()
        assert kept.phase is Phase.FINISHED and kept.concept is finished.concept and kept.prepared is finished.prepared
        first.stop()
        first._thread.join(timeout=120)
        assert len(slots) == 0
        for _ in second.continue_training(2, foreground=True):
            pass
        assert second.snapshot().step == 4
    finally:
        first.close(), second.close()
    assert len(slots) == 0


# ----------------------------------------------------------------------------- shutdown


def test_sigterm_cleans_up_like_ctrl_c(monkeypatch):
    import signal
    import time

    import app

    closed = []

    class FakeDemo:
        class sessions:  # noqa: N801 - stands in for the registry
            @staticmethod
            def close_all():
                closed.append(True)

        @staticmethod
        def launch(**_kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not end the server")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(app, "create_demo", lambda *_a: FakeDemo)
    monkeypatch.setattr(app, "launch_kwargs", dict)
    assert app.main(["--preset", "tiny"]) == 0
    assert closed == [True]
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- memory
_PEAK = """
import resource
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def test_a_huge_16_bit_png_is_decoded_without_a_full_size_intermediate():
    """A 100 KB 16-bit PNG of 7000² once cost +1.2 GB per upload. Peak RSS, fresh process."""
    result = _run_python(_PEAK + """
import io, json
import numpy as np
from PIL import Image
from studio.faces import load_photo
buffer = io.BytesIO()
Image.fromarray(np.zeros((7000, 7000), np.uint16)).save(buffer, format="PNG")
png = buffer.getvalue()
start = peak_mb()
image, notes = load_photo(png, 4_000_000)
print(json.dumps({"mb": peak_mb() - start, "size": image.size, "notes": notes}))
""")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["mb"] < 350, figures  # was ~1200 (the 16-bit pixels alone are 98 MB)
    assert max(figures["size"]) <= 2000 and "16-bit" in figures["notes"][0]


def test_a_concept_claiming_a_huge_mapper_is_refused_before_any_allocation():
    """A 300 KB concept whose metadata sizes the mapper once cost +1.8 GB before any shape check."""
    result = _run_python(_PEAK + """
import json, struct, sys
sys.path.insert(0, "tests")
from safetensors.torch import load as load_tensors, save as save_tensors
from studio.backbone import get_backbone
from studio.concept_file import ConceptFileError, concept_to_bytes, load_concept
from studio.config import load_preset
from test_sampler import make_concept
backbone = get_backbone(load_preset("tiny").model)
good = concept_to_bytes(make_concept(backbone, bypass=True))
header_len = struct.unpack("<Q", good[:8])[0]
info = json.loads(json.loads(good[8:8 + header_len])["__metadata__"]["personamagic"])
tensors = load_tensors(good)
claims = [dict(info, num_anchors=4096, time_encoding_dim=8192, hidden_dim=4096),
          dict(info, num_anchors=10**6, time_encoding_dim=10**6)]
files = [save_tensors(tensors, metadata={"personamagic": json.dumps(c)}) for c in claims]
start = peak_mb()
messages = []
for data in files:
    try:
        load_concept(data, backbone)
        raise SystemExit("a huge mapper claim was loaded")
    except ConceptFileError as exc:
        messages.append(str(exc))
print(json.dumps({"mb": peak_mb() - start, "messages": messages}))
""")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["mb"] < 50, figures
    assert "has shape" in figures["messages"][0] and "from 1 to 4096" in figures["messages"][1]


def test_server_memory_comes_back_after_repeated_sessions(faces_dir):
    """Rounds of sessions that upload, train, generate, export and close: after a warm-up round
    (models loaded, caches and allocator arenas filled) the process's RSS stays within 10 % of
    its warm level. A leak of one session's photos, trainer or optimiser grows it every round."""
    result = _run_python(f"""
        import json, sys, tempfile
        from pathlib import Path
        from studio.config import load_preset
        from studio.ui.sessions import SessionRegistry

        def rss_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

        cfg = load_preset("tiny").replace(**{{"train.steps": 4, "train.preview_every": 2}})
        registry = SessionRegistry(cfg, root=Path(tempfile.mkdtemp()))
        photos = [{str(faces_dir / "single" / "f2d_0.jpg")!r}, {str(faces_dir / "single" / "f2d_1.jpg")!r}]
        after = []
        for round_ in range(4):
            for index in range(2):
                key = f"round{{round_}}-{{index}}"
                engine = registry.get(key)
                engine.prepare_photos(photos[: 1 + index % 2])
                for _ in engine.start(foreground=True):
                    pass
                engine.generate("a photo of {{}}", seeds=[index], num_inference_steps=2)
                engine.export_concept(registry.folder(key) / "concept.safetensors")
                registry.close(key)
            after.append(rss_mb())
            print("round", round_, after[-1], file=sys.stderr, flush=True)
        print(json.dumps({{"rss_after_round": after, "open": len(registry)}}))
    """, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    warm, last = figures["rss_after_round"][0], figures["rss_after_round"][-1]
    assert figures["open"] == 0
    assert last <= warm * 1.10, figures


def test_fuzzed_concepts_and_images_never_jump_memory(tmp_path):
    """The seeded fuzz of malformed concept files and photos, in a fresh process: the peak RSS
    over all cases stays within 300 MB of the level after one good import and one good photo."""
    result = _run_python("""
        import json, resource, sys
        sys.path.insert(0, "tests")
        from studio.backbone import get_backbone
        from studio.concept_file import ConceptFileError, concept_to_bytes, load_concept
        from studio.config import FaceConfig, load_preset
        from studio.faces import PhotoError, prepare_photo
        from test_concept_safety import _malformed_concepts, _malformed_images
        from test_sampler import make_concept

        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        backbone = get_backbone(load_preset("tiny").model)
        good = concept_to_bytes(make_concept(backbone, seed=4, bypass=True))
        load_concept(good, backbone)
        cfg = FaceConfig(backend="dlib")
        base = peak_mb()
        refused = 0
        for data in _malformed_concepts(good, 300):
            try:
                load_concept(data, backbone)
            except ConceptFileError:
                refused += 1
        for data in _malformed_images(150):
            try:
                prepare_photo(data, cfg)
            except PhotoError:
                refused += 1
        print(json.dumps({"base_mb": base, "jump_mb": peak_mb() - base, "refused": refused}))
    """, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["refused"] > 300, figures  # the cases were really malformed
    assert figures["jump_mb"] < 300, figures


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("args, sentence", [
    (["train", "--steps", "0"], "train.steps must be >= 1, got 0"),
    (["train", "--steps", "1", "--seed", str(2**64)], "train.seed must be a whole number from 0 to 9223372036854775807"),
    (["train", "--steps", "1", "--set", "train.batch_size=64"], "train.batch_size must be at most 8"),
    (["generate", "--size", "100000"], "The image height can be at most 256 pixels for this model, got 100000"),
    (["generate", "--seed", str(2**64)], "Seeds must be whole numbers from 0 to 9223372036854775807"),
    (["generate", "--negative", "ugly " * 100], "The negative prompt is too long: 102 tokens"),
])
def test_cli_inputs_get_one_sentence_and_exit_2(args, sentence, faces_dir, tmp_path, capsys):
    from studio.cli import main

    if args[0] == "train":
        args = [*args, "--preset", "tiny", "--image", str(faces_dir / "single" / "f2d_0.jpg"),
                "--out", str(tmp_path / "c.safetensors")]
    else:
        args = [*args, "--preset", "tiny", "--prompt", "a photo of a face", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert sentence in err and "Traceback" not in err


def test_api_numbers_get_a_sentence_naming_the_field():
    import gradio as gr

    from studio.ui.views import as_number

    assert as_number("3", "The seed", whole=True) == 3 and as_number(2**64, "The seed", whole=True) == 2**64
    for value, sentence in (("abc", "The learning rate must be a number, got 'abc'."),
                            (float("nan"), "The learning rate must be a finite number, got nan."),
                            ("inf", "The learning rate must be a finite number, got 'inf'."),
                            (None, "The learning rate must be a number, got 'None'.")):
        with pytest.raises(gr.Error, match=sentence.replace(".", "\\.").replace("(", "\\(")):
            as_number(value, "The learning rate")
    with pytest.raises(gr.Error, match="The seed must be a whole number, got 1.5"):
        as_number(1.5, "The seed", whole=True)


def test_a_multipage_tiff_is_called_a_multipage_tiff():
    import io

    from PIL import Image

    from studio.faces import load_photo

    buffer = io.BytesIO()
    pages = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    _, notes = load_photo(buffer.getvalue(), 4_000_000)
    assert notes == ["This TIFF file has 3 pages; only the first page is used."]


def test_a_huge_te_weight_is_named_instead_of_the_learning_rate(backbone, tiny_cfg, faces_dir, monkeypatch):
    from PIL import Image

    from studio.events import TrainingFailed
    from studio.trainer import Trainer, TrainingPhoto

    photo = TrainingPhoto.center_crop(Image.open(faces_dir / "single" / "f2d_0.jpg"))
    cfg = tiny_cfg.replace(**{"train.steps": 5, "train.preview_every": 0, "train.te_weight": 1e6, "train.grad_accum": 1})
    trainer = Trainer(backbone, cfg, [photo])
    real_micro_step = trainer._micro_step

    def always_nan():
        result = real_micro_step()
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer, "_micro_step", always_nan)
    events = list(trainer.run())
    assert isinstance(events[-1], TrainingFailed)
    assert "The TE weight is far above its usual 0.001 (now 1e+06): lower it" in events[-1].message
    assert "learning rate" not in events[-1].message


def test_an_unknown_tensor_dtype_is_one_sentence_not_a_list_of_dtypes(backbone):
    import struct

    from studio.concept_file import ConceptFileError, concept_to_bytes, load_concept
    from test_sampler import make_concept

    good = concept_to_bytes(make_concept(backbone))
    (header_len,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + header_len])
    header["mapper.head.bias"]["dtype"] = "Q9"
    raw = json.dumps(header).encode()
    with pytest.raises(ConceptFileError) as caught:
        load_concept(struct.pack("<Q", len(raw)) + raw + good[8 + header_len :], backbone)
    assert "of type 'Q9', which concept files never use" in str(caught.value)
    assert "BF16" not in str(caught.value) and "F8" not in str(caught.value)


# ----------------------------------------------------------------------------- leftovers


def test_a_closed_sessions_uploads_crops_exports_and_sweeps_are_deleted(studio_app, faces_dir):
    """Exports (and later the Explore sweep's images) once left concept-* folders in the temp dir forever, and a
    closed session's files stayed downloadable. Now they live in the session's own folder inside
    Gradio's cache (served without a copy) and go when the session closes."""
    from gradio_client import Client, handle_file

    demo, url = studio_app
    before = set(demo.sessions.sessions())
    client = Client(url, verbose=False, analytics_enabled=False)
    try:
        client.predict([handle_file(str(faces_dir / "single" / "f2d_0.jpg"))], api_name="/photos")
        client.predict(3, 3e-3, 1, 0, 200, 900, 1e-3, 0.5, 0, 0.0, 400, 800, 1.0, api_name="/train")
        client.predict(api_name="/export")
        client.predict(["400,800"], [1.0], "a photo of {}", "0", 1, api_name="/explore_sweep")
        (session,) = set(demo.sessions.sessions()) - before
        folder = demo.sessions._folders[session]
        uploads = list(demo.sessions._files[session])
        names = sorted(p.name for p in folder.iterdir())
        assert any(n.startswith("crop-") for n in names) and any(n.endswith(".safetensors") for n in names)
        sweeps = [p for p in folder.iterdir() if p.name.startswith("sweep-")]
        assert len(sweeps) == 1 and {p.suffix for p in sweeps[0].iterdir()} == {".png"}  # its images and grid
        assert folder.is_relative_to(demo.sessions._root) and uploads and all(p.exists() for p in uploads)
    finally:
        client.close()
    assert demo.sessions.wait_until(lambda s: session not in s, timeout=60)
    assert not folder.exists() and not any(p.exists() for p in uploads)


def test_a_file_two_sessions_hold_and_a_sample_photo_outlive_a_closing_session(tiny_cfg, tmp_path):
    """Gradio keeps files by content: two sessions handed the same photo hold one path, and every
    visitor who clicks a sample photo is handed the same cached copy of it."""
    from studio.ui.sessions import SessionRegistry

    sample = tmp_path / "sample.png"
    sample.write_bytes(b"a sample photo")
    cached_sample, shared_upload, own_upload = tmp_path / "cache-a" / "sample.png", tmp_path / "b.jpg", tmp_path / "c.jpg"
    cached_sample.parent.mkdir()
    cached_sample.write_bytes(sample.read_bytes())
    shared_upload.write_bytes(b"the same selfie, uploaded twice")
    own_upload.write_bytes(b"only mine")
    registry = SessionRegistry(tiny_cfg, root=tmp_path / "sessions")
    registry.share(sample)
    registry.own("first", cached_sample, shared_upload, own_upload)
    registry.own("second", cached_sample, shared_upload)
    registry.close("first")
    assert cached_sample.exists() and shared_upload.exists(), "another session holds them"
    assert not own_upload.exists(), "a closed session's own upload is gone"
    registry.close("second")
    assert not shared_upload.exists(), "the last holder has gone"
    assert cached_sample.exists(), "a sample photo's copy is every visitor's"
