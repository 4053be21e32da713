"""The process-wide accelerator gate: one holder at a time, first come first served, positions."""
from __future__ import annotations

import threading

import pytest

from studio.gate import AcceleratorGate, GateCancelled


def test_holders_take_turns_in_arrival_order():
    gate = AcceleratorGate()
    order: list[str] = []
    release_first = threading.Event()
    first_in = threading.Event()

    def first():
        with gate.hold("a"):
            first_in.set()
            release_first.wait(5)
            order.append("a")

    def later(name: str, queued: threading.Event):
        queued.set()
        with gate.hold(name):
            order.append(name)

    t_a = threading.Thread(target=first)
    t_a.start()
    assert first_in.wait(5)
    threads = []
    for name in ("b", "c"):
        queued = threading.Event()
        thread = threading.Thread(target=later, args=(name, queued))
        thread.start()
        # the next holder arrives only once this one is really in the queue
        assert gate.wait_until_queued(name, timeout=5)
        threads.append(thread)
    assert gate.position("a") == 0
    assert gate.position("b") == 1
    assert gate.position("c") == 2
    release_first.set()
    for thread in (t_a, *threads):
        thread.join(5)
    assert order == ["a", "b", "c"]
    assert len(gate) == 0
    assert gate.position("a") is None


def test_a_waiting_holder_can_be_cancelled_and_leaves_the_queue():
    gate = AcceleratorGate()
    stop = threading.Event()
    errors: list[BaseException] = []
    with gate.hold("busy"):
        def waiter():
            try:
                with gate.hold("waiting", cancelled=stop.is_set):
                    pass
            except GateCancelled as exc:
                errors.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        assert gate.wait_until_queued("waiting", timeout=5)
        stop.set()
        thread.join(5)
    assert len(errors) == 1
    assert gate.position("waiting") is None


def test_an_exception_inside_the_block_releases_the_gate():
    gate = AcceleratorGate()
    with pytest.raises(RuntimeError):
        with gate.hold("a"):
            raise RuntimeError("boom")
    assert len(gate) == 0
    with gate.hold("b"):
        assert gate.position("b") == 0
