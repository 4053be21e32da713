"""Browser session -> Engine. One engine per session, created on first use, closed on unload,
or after ``idle_timeout_s`` without a request (REST and script clients have no heartbeat, so
no unload ever comes for them). At most ``max_engines`` sessions at once.

Each session also owns a folder (exports) and the files it was handed (uploads): both are
deleted when the session closes, so nothing of a closed session stays downloadable. Gradio keeps
files by their content, so two sessions handed the same photo hold one path: a file is deleted
when the last session holding it closes, and a file anyone may be handed (a sample photo's
cached copy, see :meth:`SessionRegistry.share`) is never deleted.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from studio.config import StudioConfig
from studio.engine import Engine
from studio.errors import StudioError

# A browser tab pings every KEEPALIVE_S while open (studio.ui.app); a session without any
# request for this long has been left (a closed script, a REST call nobody follows).
IDLE_TIMEOUT_S = 10 * 60.0
KEEPALIVE_S = 60.0
# Sessions (engines) served at once; each holds photos, a trainer and its optimiser state.
MAX_ENGINES = 12
_LOG = logging.getLogger(__name__)


def _return_freed_memory() -> None:
    """Hand memory freed by a closed session back to the OS. glibc keeps freed blocks in its
    per-thread arenas (every request thread has one), so without this the server's RSS only
    grows over rounds of sessions (measured in bench/RESULTS.md, load test)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file's bytes."""
    return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


class StudioFull(StudioError, RuntimeError):
    """No room for another session right now; the message says so plainly."""


class SessionRegistry:
    """Engines keyed by Gradio's ``session_hash``. Thread-safe; ``close`` is idempotent.

    ``clock`` (seconds, monotonic) is injectable so that tests can move time on.
    """

    def __init__(self, cfg: StudioConfig, *, max_engines: int = MAX_ENGINES, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 engine_factory: Callable[[StudioConfig, str], Engine] = Engine, root: Path | None = None) -> None:
        self.cfg = cfg
        self.max_engines = max_engines
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._engine_factory = engine_factory
        self._root = root  # where session folders are made (None: the system temp folder)
        self._engines: dict[str, Engine] = {}
        self._last_seen: dict[str, float] = {}
        self._folders: dict[str, Path] = {}
        self._files: dict[str, set[Path]] = {}
        self._shared: set[tuple[int, str]] = set()  # (size, sha256) of files every session may be handed
        self._closing: dict[str, int] = {}  # session hash -> close() calls still cleaning up
        self._on_close: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def get(self, session_hash: str) -> Engine:
        """The session's engine (created on first use; counts as activity). Raises StudioFull."""
        self.close_idle()
        with self._lock:
            engine = self._engines.get(session_hash)
            if engine is None or engine.closed:
                if len(self._engines) - (engine is not None) >= self.max_engines:
                    raise StudioFull(
                        f"The studio is full: {self.max_engines} people are using it right now. "
                        f"Try again in a few minutes."
                    )
                engine = self._engines[session_hash] = self._engine_factory(self.cfg, session_hash)
                self._changed.notify_all()
            self._last_seen[session_hash] = self._clock()
            return engine

    def touch(self, session_hash: str) -> None:
        """A sign of life from an open tab (keepalive); unknown sessions are ignored."""
        with self._lock:
            if session_hash in self._engines:
                self._last_seen[session_hash] = self._clock()

    def close_idle(self) -> list[str]:
        """Close the sessions without a request for ``idle_timeout_s``: their training stops and
        their engine, folder and files are freed. Returns the closed session hashes."""
        now = self._clock()
        with self._lock:
            idle = [key for key, seen in self._last_seen.items() if now - seen > self.idle_timeout_s]
        for key in idle:
            _LOG.info("closing session %s after %.0f s without a request", key[:8], self.idle_timeout_s)
            self.close(key)
        return idle

    def folder(self, session_hash: str) -> Path:
        """The session's own temp folder (exports, crops), deleted when the session closes."""
        with self._lock:
            folder = self._folders.get(session_hash)
            if folder is None or not folder.is_dir():
                if self._root is not None:
                    self._root.mkdir(parents=True, exist_ok=True)
                folder = self._folders[session_hash] = Path(tempfile.mkdtemp(prefix="session-", dir=self._root))
            return folder

    def share(self, *paths: str | Path) -> None:
        """Files whose copies any session may be handed (the sample photos): never deleted."""
        digests = {_digest(Path(p)) for p in paths}
        with self._lock:
            self._shared |= digests

    def own(self, session_hash: str, *paths: str | Path | None) -> None:
        """Files handed to this session (uploads): deleted when it closes, unless another open
        session holds them too or they are copies of a shared file."""
        handed = [Path(p) for p in paths if p]
        with self._lock:
            shared = set(self._shared)
        sizes = {size for size, _ in shared}
        mine = [p for p in handed if not (p.is_file() and p.stat().st_size in sizes and _digest(p) in shared)]
        with self._lock:
            self._files.setdefault(session_hash, set()).update(mine)

    def when_closed(self, forget: Callable[[str], None]) -> None:
        """Call ``forget(session_hash)`` whenever a session closes (unload or idle), for state kept
        about a session outside its engine."""
        self._on_close.append(forget)

    def close(self, session_hash: str) -> None:
        for forget in self._on_close:
            forget(session_hash)
        with self._lock:
            engine = self._engines.pop(session_hash, None)
            self._closing[session_hash] = self._closing.get(session_hash, 0) + 1
            self._last_seen.pop(session_hash, None)
            folder = self._folders.pop(session_hash, None)
            files = self._files.pop(session_hash, set())
            files -= set().union(*self._files.values())  # still held by an open session
        if engine is not None:
            engine.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        for path in files:
            try:
                path.unlink(missing_ok=True)
                if path.parent.is_dir() and not any(path.parent.iterdir()):
                    path.parent.rmdir()  # Gradio keeps each upload in a folder of its own
            except OSError:
                pass
        if engine is not None:
            _return_freed_memory()
        with self._lock:
            self._closing[session_hash] -= 1
            if not self._closing[session_hash]:
                del self._closing[session_hash]
            self._changed.notify_all()

    def close_all(self) -> None:
        for key in self.sessions() + list(self._folders) + list(self._files):
            self.close(key)

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(list of session hashes)`` holds; False on timeout. A session
        being closed is listed until its files are gone."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._engines) + list(self._closing)), timeout=timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)
