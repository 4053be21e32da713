"""Shared fixtures: the tiny preset and backbone, and the real face photos."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py: no spinning threads on shared cores
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
warnings.filterwarnings("ignore", message=".*Pandas4Warning.*")

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
