"""The proxy loop: source events → snapshots → ``mode.sync`` → kernel.

Owns the wiring of :class:`~kproxy.proxy.core.ProxyCore`, the
:class:`~kproxy.proxy.runner.BoundedFrequencyRunner`, a
:class:`~kproxy.proxy.mode.Mode`, :class:`~kproxy.proxy.health.ProxyHealth` and
:class:`~kproxy.proxy.metrics.ProxyMetrics`; the ``kproxy proxy`` process around
it (mode selection, source, servers, ``--cleanup``) is :mod:`kproxy.proxy.daemon`.

Invariants:

- a sync is full at startup, after a failed sync, after a Node topology change,
  when the canary chain vanished, and at least every :data:`FULL_SYNC_PERIOD`;
  otherwise it is partial (upstream ``syncProxyRules``);
- nothing syncs before the source delivered its first full set (``synced``),
  so a starting proxy never writes a ruleset without the Services it will have;
- the snapshot is taken on the event loop (the only place the trackers are
  mutated); the mode's blocking kernel calls run in a worker thread;
- a failed sync raises :class:`SyncFailed` so that the runner retries it after
  ``--iptables-sync-period``; health is updated only by a successful sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from kproxy.errors import KProxyError
from kproxy.proxy.core import ProxyCore, Snapshot
from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.healthcheck import ServiceHealthServer
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import Mode, SyncResult
from kproxy.proxy.runner import BoundedFrequencyRunner

__all__ = ["FULL_SYNC_PERIOD", "NODE_WAIT_TIMEOUT", "Proxier", "SyncFailed"]

log = logging.getLogger(__name__)

# proxyutil.FullSyncPeriod: also the runner's max interval.
FULL_SYNC_PERIOD: Final = 3600.0
# How long a starting proxy waits for the Node informer's first list.
NODE_WAIT_TIMEOUT: Final = 30.0


class SyncFailed(KProxyError):
    """A sync did not apply; the runner retries it after the sync period."""


def _parse_trigger_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        log.warning("ignoring a malformed last-change-trigger-time %r", text)
        return None


class Proxier:
    """Decides when a sync is full, runs it, and keeps health and metrics."""

    def __init__(
        self,
        core: ProxyCore,
        mode: Mode,
        *,
        health: ProxyHealth,
        metrics: ProxyMetrics,
        sync_period: float = 30.0,
        min_sync_period: float = 1.0,
        full_sync_period: float = FULL_SYNC_PERIOD,
        canary: Callable[[], bool] | None = None,
        on_topology: Callable[[tuple[tuple[str, str], ...]], None] | None = None,
        after_sync: Callable[[Snapshot], object] | None = None,
        health_checks: ServiceHealthServer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.mode = mode
        self.health = health
        self.metrics = metrics
        self.sync_period = sync_period
        self.full_sync_period = full_sync_period
        self._canary = canary
        self._on_topology = on_topology
        self._after_sync = after_sync
        self.health_checks = health_checks
        self._clock = clock
        self._wall = wall
        self.family = core.family
        self.need_full = True
        self.last_full = -float("inf")
        self.syncs: list[SyncResult] = []  # bounded: the last few, for tests and logs
        self._node: Any = None
        self.runner = BoundedFrequencyRunner(
            "sync-runner", self.sync, min_sync_period, sync_period, full_sync_period
        )
        core.on_change = self.on_change
        if core.node is not None:
            self.on_change()

    # -- events ----------------------------------------------------------------
    def on_change(self) -> None:
        if self.core.node is not self._node:
            self._node = self.core.node
            self.health.sync_node(self._node)
        self.health.queued_update(self.family)
        self.metrics.last_queued_timestamp.labels(ip_family=self.family).set(self._wall())
        self._set_pending()
        self.runner.run()

    def _set_pending(self) -> None:
        svc, eps = self.core.pending
        self.metrics.service_changes_pending.set(svc)
        self.metrics.endpoint_changes_pending.set(eps)

    def force_full(self) -> None:
        self.need_full = True
        self.runner.run()

    def check_canary(self) -> bool:
        """Poll the mode's canary; a missing one forces a full resync. True if present."""
        present = self._canary is None or self._canary()
        if not present:
            self._canary_lost()
        return present

    def _canary_lost(self) -> None:
        log.warning("the canary chain is gone (rules flushed?); forcing a full resync")
        self.force_full()

    # -- syncing ---------------------------------------------------------------
    def prepare(self) -> tuple[Snapshot, bool] | None:
        """Take the snapshot and decide full vs partial; None before the first full set."""
        if not self.core.synced_once:
            log.debug("not syncing: the source has not delivered its first full set")
            return None
        svc, eps = self.core.pending
        snap = self.core.snapshot()
        # Counted per coalesced change (an object updated twice between syncs counts once).
        self.metrics.service_changes.inc(svc)
        self.metrics.endpoint_changes.inc(eps)
        self._set_pending()
        if snap.topology_changed and self._on_topology is not None:
            self._on_topology(self.core.topology_labels(self.core.node))
        full = (
            self.need_full
            or snap.topology_changed
            or self._clock() - self.last_full >= self.full_sync_period
        )
        return snap, full

    def finish(self, snap: Snapshot, full: bool, result: SyncResult, elapsed: float) -> None:
        fam = self.family
        done_full = result.full or full
        self.metrics.sync_duration.labels(ip_family=fam).observe(elapsed)
        split = self.metrics.sync_full_duration if done_full else self.metrics.sync_partial_duration
        split.labels(ip_family=fam).observe(elapsed)
        self.syncs = [*self.syncs[-9:], result]
        if not result.ok:
            self.need_full = True
            raise SyncFailed(f"{self.mode.name} sync failed: {result.error}")
        if done_full:
            self.need_full = False
            self.last_full = self._clock()
        now = self._wall()
        self.health.updated(fam)
        self.metrics.last_sync_timestamp.labels(ip_family=fam).set(now)
        for times in snap.trigger_times.values():
            for text in times:
                t = _parse_trigger_time(text)
                if t is not None and now >= t:
                    self.metrics.network_programming_duration.labels(ip_family=fam).observe(now - t)
        log.debug(
            "%s %s sync took %.3fs: %s",
            self.mode.name,
            "full" if done_full else "partial",
            elapsed,
            dict(result.rules_written),
        )

    def run_after_sync(self, snap: Snapshot) -> None:
        """The post-sync hook (UDP conntrack cleanup); its failure never fails the sync."""
        if self._after_sync is None:
            return
        try:
            self._after_sync(snap)
        except Exception:
            log.exception("post-sync cleanup failed; the next sync retries it")

    def sync_now(self) -> SyncResult | None:
        """One sync on the calling thread (tests, ``--init-only``-like uses)."""
        prepared = self.prepare()
        if prepared is None:
            return None
        snap, full = prepared
        start = time.monotonic()
        result = self.mode.sync(snap, full)
        self.finish(snap, full, result, time.monotonic() - start)
        self.run_after_sync(snap)
        return result

    async def sync(self) -> None:
        """The runner's sync function: the kernel work runs in a worker thread."""
        prepared = self.prepare()
        if prepared is None:
            return
        snap, full = prepared
        start = time.monotonic()
        result = await asyncio.to_thread(self.mode.sync, snap, full)
        self.finish(snap, full, result, time.monotonic() - start)
        if self.health_checks is not None:
            # Upstream syncs the health-check servers after the rules.
            await self.health_checks.sync_services(self.core.service_map.health_check_node_ports())
            self.health_checks.sync_endpoints(self.core.endpoints_map.local_ready_endpoints())
        if self._after_sync is not None:
            await asyncio.to_thread(self.run_after_sync, snap)

    async def canary_loop(self) -> None:
        """Poll the canary every sync period, as upstream's rule monitor does."""
        if self._canary is None:
            return
        while True:
            await asyncio.sleep(self.sync_period)
            if not await asyncio.to_thread(self._canary):
                self._canary_lost()
