"""One fair, process-wide gate for accelerator work (training steps, previews, generations).

Holders queue in arrival order. A session that trains holds the gate for one step at a time
and queues again behind whoever arrived meanwhile, so sessions take turns step by step, and
a waiting session can show its place in line instead of a frozen spinner.
"""
from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from studio.errors import StudioError


class GateCancelled(Exception):
    """The wait for the gate was abandoned (the session stopped or closed)."""


@dataclass(eq=False)
class _Ticket:
    """One place in line; compared by identity (an owner may hold one and wait for another)."""

    owner: str


class AcceleratorGate:
    """FIFO mutual exclusion with queue positions per owner (a session id)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()

    @contextlib.contextmanager
    def hold(self, owner: str, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        """Wait for the turn of ``owner``, run the block, release. Raises GateCancelled if
        ``cancelled()`` turns true while waiting."""
        ticket = _Ticket(owner)
        with self._cond:
            self._queue.append(ticket)
            self._cond.notify_all()  # queue positions changed
            while self._queue[0] is not ticket:
                if cancelled is not None and cancelled():
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise GateCancelled(owner)
                # Timed wait only so that `cancelled` (set without notifying us) is seen.
                self._cond.wait(timeout=0.1)
        try:
            yield
        finally:
            with self._cond:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def position(self, owner: str) -> int | None:
        """0 while ``owner`` holds the gate, n while n holders are ahead of it, None if absent."""
        with self._cond:
            for index, ticket in enumerate(self._queue):
                if ticket.owner == owner:
                    return index
        return None

    def wait_until_queued(self, owner: str, timeout: float) -> bool:
        """Block until ``owner`` holds or waits for the gate; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: any(t.owner == owner for t in self._queue), timeout=timeout)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)


class StudioBusy(StudioError, RuntimeError):
    """Too many trainings on this server right now; the message says so plainly."""


class TrainingSlots:
    """At most ``limit`` sessions training (running or waiting for the gate) at once, server-wide.

    Every training shares one accelerator step by step, so each one more slows all of them;
    past the limit a new training is refused with a sentence instead of queueing without end.
    A session holds at most one slot; ``release`` is idempotent.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._owners: set[str] = set()

    def claim(self, owner: str) -> None:
        """Take a slot for ``owner`` (kept if it has one). Raises StudioBusy when all are taken."""
        with self._lock:
            if owner not in self._owners and len(self._owners) >= self.limit:
                raise StudioBusy(
                    f"The studio is busy: {self.limit} trainings are running on this server right now. "
                    f"Try again in a few minutes; generating and previews still work."
                )
            self._owners.add(owner)

    def release(self, owner: str) -> None:
        with self._lock:
            self._owners.discard(owner)

    def __len__(self) -> int:
        with self._lock:
            return len(self._owners)


# Trainings at once per server: each extra one slows every other (they take turns per step).
MAX_TRAININGS = 4
GATE = AcceleratorGate()
TRAINING_SLOTS = TrainingSlots(MAX_TRAININGS)
