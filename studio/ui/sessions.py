"""Browser session -> Engine. One engine per session, created on first use, closed on unload."""
from __future__ import annotations

import threading

from studio.config import StudioConfig
from studio.engine import Engine


class SessionRegistry:
    """Engines keyed by Gradio's ``session_hash``. Thread-safe; ``close`` is idempotent."""

    def __init__(self, cfg: StudioConfig) -> None:
        self.cfg = cfg
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def get(self, session_hash: str) -> Engine:
        with self._lock:
            engine = self._engines.get(session_hash)
            if engine is None or engine.closed:
                engine = self._engines[session_hash] = Engine(self.cfg, session_hash)
                self._changed.notify_all()
            return engine

    def close(self, session_hash: str) -> None:
        with self._lock:
            engine = self._engines.pop(session_hash, None)
        if engine is not None:
            engine.close()
        with self._lock:
            self._changed.notify_all()

    def close_all(self) -> None:
        for key in list(self._engines):
            self.close(key)

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(list of session hashes)`` holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._engines)), timeout=timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)
