"""Pending pods: the active queue, per-pod backoff and the unschedulable set.

Owns :class:`SchedulingQueue`, a small version of upstream's ``PriorityQueue``:

- ``activeQ``: pods to try now, FIFO, each at most once (:meth:`add` dedups);
- backoff: a pod that failed is tried again after ``initial × 2**(attempts−1)``
  seconds, capped at ``max_backoff`` (upstream: 1 s and 10 s);
- unschedulable: a pod no node fits waits (:meth:`park`) until the cluster changes
  (:meth:`move_all`, called on node and pod-removal events) — then it is retried once
  its backoff has passed — or at most ``max_unschedulable`` seconds (upstream's
  ``podMaxInUnschedulablePodsDuration``, 5 min), checked by :meth:`flush`.

Invariants: a key is handed out to one cycle at a time; an :meth:`add` while its cycle
runs is remembered and honoured at :meth:`done`; :meth:`forget` drops every trace of
a pod (bound or deleted).
"""

from __future__ import annotations

import asyncio
from collections import deque


class SchedulingQueue:
    def __init__(
        self,
        *,
        initial_backoff: float = 1.0,
        max_backoff: float = 10.0,
        max_unschedulable: float = 300.0,
    ) -> None:
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_unschedulable = max_unschedulable
        self._active: deque[str] = deque()
        self._in_active: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._backoff_until: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._parked: dict[str, float] = {}  # key → when it was parked
        self._ready = asyncio.Event()
        self._closed = False

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def __contains__(self, key: str) -> bool:
        return (
            key in self._in_active
            or key in self._timers
            or key in self._parked
            or key in self._processing
        )

    @property
    def parked(self) -> list[str]:
        return sorted(self._parked)

    def attempts(self, key: str) -> int:
        return self._attempts.get(key, 0)

    def backoff(self, key: str) -> float:
        n = self._attempts.get(key, 0)
        if n == 0:
            return 0.0
        return float(min(self.initial_backoff * 2 ** (n - 1), self.max_backoff))

    # --------------------------------------------------------------- adding

    def add(self, key: str) -> None:
        """A new or changed pending pod: try it (after any backoff it still owes)."""
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._parked.pop(key, None)
        self._activate(key)

    def _activate(self, key: str) -> None:
        if key in self._in_active or key in self._timers:
            return
        wait = self._backoff_until.get(key, 0.0) - self._now()
        if wait > 0:
            self._timers[key] = asyncio.get_running_loop().call_later(wait, self._fire, key)
            return
        self._active.append(key)
        self._in_active.add(key)
        self._ready.set()

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self._activate(key)

    async def pop(self) -> str | None:
        """The next pod to schedule, or ``None`` once closed."""
        while True:
            if self._closed:
                return None
            if self._active:
                key = self._active.popleft()
                self._in_active.discard(key)
                self._processing.add(key)
                return key
            self._ready.clear()
            await self._ready.wait()

    # ------------------------------------------------------------- outcomes

    def _count_attempt(self, key: str) -> None:
        self._attempts[key] = self._attempts.get(key, 0) + 1
        self._backoff_until[key] = self._now() + self.backoff(key)

    def retry(self, key: str) -> None:
        """The cycle failed for a reason other than fit (e.g. the bind): back off."""
        self._count_attempt(key)
        self._dirty.add(key)

    def park(self, key: str) -> None:
        """No node fits: wait for the cluster to change."""
        self._count_attempt(key)
        self._parked[key] = self._now()

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self._parked.pop(key, None)
            self._activate(key)

    def forget(self, key: str) -> None:
        self._parked.pop(key, None)
        self._dirty.discard(key)
        self._attempts.pop(key, None)
        self._backoff_until.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._in_active:
            self._in_active.discard(key)
            self._active.remove(key)

    # --------------------------------------------------------- cluster events

    def move_all(self) -> None:
        """Something changed that may make parked pods fit: retry them (after backoff)."""
        for key in list(self._parked):
            del self._parked[key]
            self._activate(key)

    def flush(self) -> None:
        """Retry pods parked longer than ``max_unschedulable``."""
        now = self._now()
        for key, since in list(self._parked.items()):
            if now - since >= self.max_unschedulable:
                del self._parked[key]
                self._activate(key)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.set()
