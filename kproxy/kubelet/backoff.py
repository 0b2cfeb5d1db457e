"""Crash-loop back-off: how long a container waits before its next restart.

Owns :class:`CrashBackoff`, a pure function of exits and their times (no clock of its
own), as upstream's per-container ``flowcontrol.Backoff``: the first restart waits
``initial`` (10 s), each further one twice the last, capped at ``cap`` (300 s); a
container that ran for at least ``reset_after`` (2 × cap, 10 min) before exiting
starts over at ``initial``.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INITIAL = 10.0
DEFAULT_CAP = 300.0


@dataclass
class CrashBackoff:
    initial: float = DEFAULT_INITIAL
    cap: float = DEFAULT_CAP
    reset_after: float | None = None  # None: 2 × cap
    _next: float = 0.0

    def delay(self, ran_for: float) -> float:
        """The wait before restarting a container that exited after ``ran_for`` seconds."""
        reset_after = self.reset_after if self.reset_after is not None else 2 * self.cap
        if ran_for >= reset_after:
            self._next = 0.0
        current = self._next or self.initial
        self._next = min(current * 2, self.cap)
        return min(current, self.cap)

    def reset(self) -> None:
        self._next = 0.0
