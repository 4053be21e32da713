"""A server many strangers share (issue 16): no crash from concurrent photo work, bounded
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
    """Issue 16, item 1: the shared dlib models called from several threads at once."""
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
