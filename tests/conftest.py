"""Shared fixtures: the tiny preset and backbone, and the real face photos."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py: no spinning threads on shared cores
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
warnings.filterwarnings("ignore", message=".*Pandas4Warning.*")
# Each pytest-xdist worker's servers keep files in a cache of their own. Gradio names a cached
# file after its content, so two workers handed the same photo would share one path, and a
# session closing in one worker (which deletes its uploads) would delete the other's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    os.environ["GRADIO_TEMP_DIR"] = str(_cache / os.environ["PYTEST_XDIST_WORKER"])

REPO = Path(__file__).resolve().parent.parent


def _faces_dir() -> Path:
    env = os.environ.get("STUDIO_FACES_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """../shared/data/faces (or $STUDIO_FACES_DIR): real photos; missing is a failure, not a skip."""
    path = _faces_dir()
    if not (path / "single").is_dir():
        pytest.fail(f"test photos not found at {path}; set STUDIO_FACES_DIR to the faces folder")
    return path


def _preset(name: str):
    from studio.config import load_preset

    return load_preset(name)


def _backbone_for(cfg):
    from studio.backbone import get_backbone

    return get_backbone(cfg.model)


@pytest.fixture(scope="session")
def tiny_cfg():
    return _preset("tiny")


@pytest.fixture(scope="session")
def backbone(tiny_cfg):
    return _backbone_for(tiny_cfg)


@pytest.fixture(scope="session")
def training_photos(faces_dir, tiny_cfg):
    """One prepared photo of a real face, as the trainer takes it (a TrainingPhoto list)."""
    from studio.faces import get_face_analyzer, prepare
    from studio.trainer import TrainingPhoto

    prepared = prepare([str(faces_dir / "single" / "f2d_0.jpg")], tiny_cfg.face, get_face_analyzer(tiny_cfg.face))
    return [TrainingPhoto.from_prepared(p) for p in prepared.photos]


@pytest.fixture(scope="session")
def toy_cfg():
    """The toy world's preset (the shipped weights in assets/toy)."""
    return _preset("toy")


@pytest.fixture(scope="session")
def toy_backbone(toy_cfg):
    return _backbone_for(toy_cfg)


# Fast heartbeats so that closing a client or tab fires demo.unload within a second.
os.environ.setdefault("GRADIO_IS_E2E_TEST", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def studio_app():
    """The studio on the tiny preset, launched in this process: (demo, url)."""
    import app

    demo = app.create_demo("tiny")
    demo.launch(
        server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
        **app.launch_kwargs(),
    )
    yield demo, demo.local_url
    demo.sessions.close_all()
    demo.close()


# What a page says that a test may wait for: its messages (toasts), status line and photo report.
_PAGE_SAYS = """() => {
    const text = (el) => (el?.innerText || '').trim().slice(0, 800);
    const toasts = [...document.querySelectorAll('[data-testid="toast-body"]')].map(text);
    return [`messages: ${JSON.stringify(toasts)}`, `status: ${text(document.getElementById('status'))}`,
            `photo report: ${text(document.getElementById('photo-report'))}`].join('\\n');
}"""


def _thread_stacks(frames_per_thread: int = 6) -> str:
    """The innermost frames of every thread of this process (the in-process server's too)."""
    import sys
    import threading
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)[-frames_per_thread:]
        lines.append(f"{names.get(ident, ident)}: " + " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)))
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test reports what each of its open pages said at that moment (a toast,
    a status line) and where the server's threads were: a wait that timed out then shows what
    came instead of what was awaited, or what the server was stuck on."""
    outcome = yield
    report = outcome.get_result()
    browser = getattr(item, "funcargs", {}).get("browser")
    if report.when != "call" or not report.failed or browser is None:
        return
    for number, context in enumerate(browser.contexts):
        for page in context.pages:
            try:
                text = page.evaluate(_PAGE_SAYS)
            except Exception as exc:  # a closed or crashed page: say so instead of its text
                text = f"(could not read the page: {exc})"
            report.sections.append((f"page {number} ({page.url}) said", text))
    report.sections.append(("threads at the failure", _thread_stacks()))
