"""`python app.py` as a user runs it: offline on the toy world, on the port GRADIO_SERVER_PORT names."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_app_starts_offline_on_toy_and_honours_gradio_server_port():
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("STUDIO_PRESET", None)
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in process.stdout:  # blocks until the server says where it runs (or exits)
            lines.append(line)
            if "Running on local URL" in line:
                break
        assert any(f":{port}" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read().decode()
        assert response.status == 200 and "PersonaMagic Studio" in page
        assert "Toy world." in page, "no real weights here: the toy preset and its banner"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_unknown_preset_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "app.py", "--preset", "no-such-preset"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "no preset 'no-such-preset'" in result.stderr and "tiny" in result.stderr
