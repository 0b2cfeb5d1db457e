"""Crash-loop back-off: 10 s doubling to 300 s, reset after a long run."""

from __future__ import annotations

from kproxy.kubelet.backoff import CrashBackoff


def test_doubles_to_the_cap() -> None:
    b = CrashBackoff()
    assert [b.delay(1.0) for _ in range(8)] == [10, 20, 40, 80, 160, 300, 300, 300]


def test_resets_after_running_long_enough() -> None:
    b = CrashBackoff(initial=1, cap=8)
    assert [b.delay(0.1) for _ in range(3)] == [1, 2, 4]
    assert b.delay(16.0) == 1  # ran for 2 × cap: starts over
    assert b.delay(0.1) == 2


def test_explicit_reset() -> None:
    b = CrashBackoff(initial=0.5, cap=2)
    b.delay(0)
    b.delay(0)
    b.reset()
    assert b.delay(0) == 0.5
