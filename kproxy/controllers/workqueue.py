"""A work queue of keys and the reconcile loop that drains it (client-go's workqueue).

Owns :class:`WorkQueue` (dedup, delayed adds, per-key exponential backoff),
:class:`RateLimiter` and :func:`run_workers` (N workers calling ``reconcile(key)``).

Invariants, as client-go's:

- A key is queued at most once: adding a queued key is a no-op.
- A key is processed by at most one worker at a time: adding a key that is being
  processed marks it dirty, and it is queued again when :meth:`WorkQueue.done` is
  called, so no change is lost and no key is reconciled concurrently.
- Delayed adds (:meth:`WorkQueue.add_after`) keep the earliest deadline per key.
- A failing reconcile is retried with per-key exponential backoff; success forgets
  the key's failures. ``reconcile`` may also return a delay in seconds to be called
  again later (a timer), which does not count as a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

Reconcile = Callable[[str], Awaitable[float | None]]


class RateLimiter:
    """Per-key exponential backoff: ``base * 2**failures`` capped at ``cap`` seconds."""

    def __init__(self, base: float = 0.005, cap: float = 300.0) -> None:
        self.base = base
        self.cap = cap
        self._failures: dict[str, int] = {}

    def when(self, key: str) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return float(min(self.base * (2**n), self.cap))

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)


class WorkQueue:
    def __init__(self, name: str = "", rate_limiter: RateLimiter | None = None) -> None:
        self.name = name
        self.rate_limiter = rate_limiter or RateLimiter()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()  # client-go's "dirty"
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._ready = asyncio.Event()
        self._shutdown = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def shutting_down(self) -> bool:
        return self._shutdown

    def add(self, key: str) -> None:
        if self._shutdown or key in self._queued:
            return
        self._queued.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._wake()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds (now if ``delay <= 0``)."""
        if self._shutdown:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= deadline:
                return
            pending[1].cancel()
        handle = loop.call_at(deadline, self._fire, key)
        self._timers[key] = (deadline, handle)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: str) -> None:
        self.add_after(key, self.rate_limiter.when(key))

    def forget(self, key: str) -> None:
        self.rate_limiter.forget(key)

    def num_requeues(self, key: str) -> int:
        return self.rate_limiter.failures(key)

    def _wake(self) -> None:
        self._ready.set()

    async def get(self) -> str | None:
        """The next key (now being processed), or ``None`` once shut down."""
        while True:
            if self._shutdown:
                return None
            if self._queue:
                key = self._queue.popleft()
                self._processing.add(key)
                self._queued.discard(key)
                return key
            # Every waiter wakes and re-checks; the losers wait again.
            self._ready.clear()
            await self._ready.wait()

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._queued:
            self._queue.append(key)
            self._wake()

    def shutdown(self) -> None:
        self._shutdown = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._wake()


async def run_workers(
    queue: WorkQueue, reconcile: Reconcile, *, workers: int = 1, name: str = ""
) -> None:
    """Run ``workers`` loops draining ``queue`` into ``reconcile`` until cancelled."""
    label = name or queue.name

    async def worker() -> None:
        while True:
            key = await queue.get()
            if key is None:
                return
            try:
                again = await reconcile(key)
            except Exception as exc:
                delay = queue.rate_limiter.when(key)
                log.warning(
                    "%s: reconcile %s failed (%s: %s); retry %d in %.3fs",
                    label,
                    key,
                    type(exc).__name__,
                    exc,
                    queue.num_requeues(key),
                    delay,
                    # API and transport errors are routine (conflicts, restarts).
                    exc_info=not isinstance(exc, KProxyError),
                )
                queue.add_after(key, delay)
            else:
                queue.forget(key)
                if again is not None:
                    queue.add_after(key, again)
            finally:
                queue.done(key)

    tasks = [asyncio.create_task(worker(), name=f"{label}-worker-{i}") for i in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["RateLimiter", "Reconcile", "WorkQueue", "run_workers"]
