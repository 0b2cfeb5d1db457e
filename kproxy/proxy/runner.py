"""Bounded-frequency sync runner (upstream ``pkg/proxy/runner``).

Owns *when* the proxy syncs, never *what* it syncs:

- ``run()`` asks for a sync; requests coalesce, and two syncs start at least
  ``min_interval`` apart (``--iptables-min-sync-period``, measured start to
  start as upstream does);
- a failed sync is retried after ``retry_interval`` (``--iptables-sync-period``);
- a sync happens at least every ``max_interval`` even with no request (the
  proxy's sync function decides whether that one is a full resync).

The scheduling decision is the pure function :func:`next_due`, so that the
policy is unit-tested without sleeping; :class:`BoundedFrequencyRunner` is the
thin asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunnerState:
    """What the scheduling decision depends on (times from a monotonic clock)."""

    last_start: float = -math.inf
    pending: bool = False
    retry_at: float | None = None
    periodic_at: float = math.inf


def next_due(state: RunnerState, min_interval: float) -> float:
    """The monotonic time at which the next sync should start."""
    due = state.periodic_at
    if state.pending:
        due = min(due, state.last_start + min_interval)
    if state.retry_at is not None:
        # A retry still respects the minimum interval between two syncs.
        due = min(due, max(state.retry_at, state.last_start + min_interval))
    return due


class BoundedFrequencyRunner:
    """Calls ``fn`` on request, at most once per ``min_interval``, at least once per
    ``max_interval``."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Awaitable[None]],
        min_interval: float,
        retry_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or retry_interval <= 0 or max_interval <= 0:
            raise ValueError("runner intervals must be positive (min_interval may be 0)")
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._retry = retry_interval
        self._max = max_interval
        self._clock = clock
        self._state = RunnerState(periodic_at=clock() + max_interval)
        self._wake = asyncio.Event()
        self._stopped = False
        self.runs = 0
        self.failures = 0

    @property
    def state(self) -> RunnerState:
        return self._state

    def run(self) -> None:
        """Request a sync; returns at once, the loop coalesces requests."""
        self._state.pending = True
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def loop(self) -> None:
        """Run until :meth:`stop`; the first sync happens when first requested."""
        while not self._stopped:
            delay = next_due(self._state, self._min) - self._clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                continue
            await self._run_once()

    async def _run_once(self) -> None:
        state = self._state
        now = self._clock()
        state.last_start = now
        state.pending = False
        state.retry_at = None
        self.runs += 1
        try:
            await self._fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The sync function reports its own failure; the runner only
            # schedules the retry, as upstream's does.
            log.exception("%s: sync failed; retrying in %.1fs", self.name, self._retry)
            self.failures += 1
            state.retry_at = self._clock() + self._retry
        state.periodic_at = now + self._max
