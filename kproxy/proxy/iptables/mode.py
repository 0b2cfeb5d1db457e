"""The thin iptables applier: hands the renderer's output to the kernel.

Owns the I/O of the iptables mode and nothing about what the rules say (that
is :mod:`kproxy.proxy.iptables.render`):

- on a full sync, ensure the jump rules from the built-in chains (``iptables -C``
  then ``-I`` at position 1, as upstream) and the empty ``KUBE-PROXY-CANARY``
  chain in mangle, nat and filter;
- read the existing nat chains with ``iptables-save -t nat`` so that stale
  service chains are deleted; in large-cluster mode only once per sync period
  (upstream PR #110334), otherwise on every sync;
- one ``iptables-restore --noflush --counters`` per sync;
- keep upstream's restore-failure counters and rule gauges.

Invariants: a failed sync (jump rules or restore) returns ``ok=False`` and
makes the next sync full; :meth:`IptablesMode.cleanup` removes every chain and
jump rule this mode creates and is idempotent. :class:`DryRunIptablesMode`
renders the same text but writes it to a stream instead of the kernel.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Final, TextIO

from kproxy.kernel.iptables import IptablesBackend, IptablesError, RulePosition
from kproxy.proxy.core import Snapshot
from kproxy.proxy.iptables.chains import (
    FILTER_TOP_CHAINS,
    JUMP_CHAINS,
    KUBE_PROXY_CANARY,
    KUBELET_FIREWALL,
    KUBELET_JUMP_CHAINS,
    NAT_TOP_CHAINS,
    RenderOptions,
    is_service_chain,
)
from kproxy.proxy.iptables.render import IPTablesRenderer, RenderResult
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import SyncResult
from kproxy.proxy.types import IPV4, IPV6

__all__ = ["CANARY_TABLES", "DryRunIptablesMode", "IptablesMode", "owned_chain"]

log = logging.getLogger(__name__)

# Upstream's rule monitor creates the canary in these tables (mangle first).
CANARY_TABLES: Final = ("mangle", "nat", "filter")
_OWNED_FIXED: Final = frozenset(
    {*FILTER_TOP_CHAINS, *NAT_TOP_CHAINS, KUBELET_FIREWALL, KUBE_PROXY_CANARY}
)
_CHAIN_LINE: Final = re.compile(r"^:(\S+) ", re.M)
_DELETE_LINE: Final = re.compile(r"^-X (\S+)", re.M)


def owned_chain(name: str) -> bool:
    """A chain this mode creates (kubelet's hint/canary chains are not ours)."""
    return name in _OWNED_FIXED or is_service_chain(name)


def _chains_in_save(save: str) -> list[str]:
    return _CHAIN_LINE.findall(save)


class _Renders:
    """What the real and the dry-run applier share: renderer, gauges, clock."""

    def __init__(
        self,
        options: RenderOptions,
        metrics: ProxyMetrics | None,
        *,
        sync_period: float,
        clock: Callable[[], float],
    ) -> None:
        self.renderer = IPTablesRenderer(options)
        self.metrics = metrics
        self.family = IPV6 if options.ipv6 else IPV4
        self.sync_period = sync_period
        self._clock = clock
        self._last_cleanup = -float("inf")
        self.need_full = True

    @property
    def name(self) -> str:
        return "iptables"

    def set_topology_labels(self, labels: tuple[tuple[str, str], ...]) -> None:
        """The Node's topology labels changed (the loop forces a full sync with it)."""
        self.renderer.options = replace(self.renderer.options, topology_labels=labels)

    def large_cluster(self, snapshot: Snapshot) -> bool:
        # The same count the renderer uses, needed before rendering to know
        # whether this sync may skip iptables-save.
        total = sum(len(snapshot.endpoints.get(spn, ())) for spn in snapshot.services)
        return total > self.renderer.options.large_cluster_threshold

    def cleanup_due(self, snapshot: Snapshot) -> bool:
        """Whether this sync looks for stale chains (always, but rarely in large clusters)."""
        if not self.large_cluster(snapshot):
            return True
        return self._clock() - self._last_cleanup >= self.sync_period

    def cleanup_done(self) -> None:
        self._last_cleanup = self._clock()

    def render(
        self, snapshot: Snapshot, full: bool, existing: Iterable[str] | None
    ) -> RenderResult:
        return self.renderer.render(
            snapshot.services,
            snapshot.endpoints,
            snapshot.changed,
            full=full,
            existing_nat_chains=existing,
        )

    def record(self, r: RenderResult) -> SyncResult:
        m, fam = self.metrics, self.family
        written = {"filter": r.filter_rules, "nat": r.nat_rules_last}
        total = {"filter": r.filter_rules, "nat": r.nat_rules_total}
        if m is not None:
            no_local = (r.no_local_endpoints_internal, r.no_local_endpoints_external)
            m.rules_synced(fam, written, total, no_local=no_local)
        return SyncResult(
            full=r.full,
            ok=True,
            rules_written=written,
            rules_total=total,
            deleted_chains=r.deleted_chains,
        )

    def failed(self, full: bool, error: str) -> SyncResult:
        self.need_full = True
        if self.metrics is not None:
            self.metrics.restore_failed(self.family, partial=not full)
        return SyncResult(full=full, ok=False, error=error)


class IptablesMode(_Renders):
    """Applies the iptables renderer's output through an :class:`IptablesBackend`."""

    def __init__(
        self,
        ipt: IptablesBackend,
        options: RenderOptions,
        metrics: ProxyMetrics | None = None,
        *,
        sync_period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(options, metrics, sync_period=sync_period, clock=clock)
        self.ipt = ipt

    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        return self._sync(snapshot, full or self.need_full)

    def _sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        if full:
            try:
                self.ensure_jumps()
            except IptablesError as e:
                # Upstream returns before the restore; the restore counters are not bumped.
                log.error("cannot ensure the jump rules: %s", e)
                self.need_full = True
                return SyncResult(full=full, ok=False, error=str(e))
        existing: list[str] | None = None
        if self.cleanup_due(snapshot):
            try:
                existing = _chains_in_save(self.ipt.save("nat"))
            except IptablesError as e:
                # Without the list, stale chains wait for the next sync; rules still apply.
                log.error("iptables-save -t nat failed, not deleting stale chains: %s", e)
        rendered = self.render(snapshot, full, existing)
        try:
            self.ipt.restore(rendered.text, noflush=True, counters=True)
        except IptablesError as e:
            log.error("iptables-restore failed (%s sync): %s", "full" if full else "partial", e)
            return self.failed(full, str(e))
        if existing is not None:
            self.cleanup_done()
        self.need_full = False
        return self.record(rendered)

    def ensure_jumps(self) -> None:
        """The canary chains, then every jump rule from a built-in chain (full syncs)."""
        for table in CANARY_TABLES:
            self.ipt.ensure_chain(table, KUBE_PROXY_CANARY)
        for jump in (*JUMP_CHAINS, *KUBELET_JUMP_CHAINS):
            self.ipt.ensure_chain(jump.table, jump.chain)
            self.ipt.ensure_rule(RulePosition.PREPEND, jump.table, jump.source, jump.rule_args())

    def canary_present(self) -> bool:
        """False when someone flushed our tables (any table's canary gone).

        Upstream polls only mangle (issue #129128); a flush of nat or filter alone
        would then go unnoticed for up to an hour, so all three are checked.
        """
        try:
            return all(self.ipt.chain_exists(t, KUBE_PROXY_CANARY) for t in CANARY_TABLES)
        except IptablesError as e:
            log.error("cannot check the canary chains: %s", e)
            return False

    def cleanup(self) -> None:
        """Remove the jump rules and every chain this mode owns (idempotent)."""
        errors: list[str] = []
        for jump in (*JUMP_CHAINS, *KUBELET_JUMP_CHAINS):
            try:
                # -C on a rule whose target chain is gone is an error, not "absent".
                if self.ipt.chain_exists(jump.table, jump.chain):
                    self.ipt.delete_rule(jump.table, jump.source, jump.rule_args())
            except IptablesError as e:
                errors.append(str(e))
        for table in ("filter", "nat", "mangle"):
            try:
                chains = [c for c in _chains_in_save(self.ipt.save(table)) if owned_chain(c)]
                if not chains:
                    continue
                # Flush all first: our chains jump to each other, and -X needs no references.
                lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
                lines += [f"-X {c}" for c in chains]
                self.ipt.restore("\n".join([*lines, "COMMIT", ""]), noflush=True, counters=False)
            except IptablesError as e:
                errors.append(str(e))
        self.need_full = True
        for problem in errors:
            log.error("iptables cleanup: %s", problem)
        if errors:
            raise IptablesError(f"iptables cleanup left work undone ({len(errors)} errors)")


class DryRunIptablesMode(_Renders):
    """Renders like :class:`IptablesMode` but writes each restore input to ``out``.

    Each sync's text is preceded by exactly one ``# kproxy sync <n> <full|partial>``
    line. The nat chains that "exist" (for stale-chain deletion) are those the
    previous outputs created and did not delete.
    """

    def __init__(
        self,
        out: TextIO,
        options: RenderOptions,
        metrics: ProxyMetrics | None = None,
        *,
        sync_period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(options, metrics, sync_period=sync_period, clock=clock)
        self.out = out
        self.syncs = 0
        self.existing_nat: set[str] = set()

    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        full = full or self.need_full
        existing: set[str] | None = None
        if self.cleanup_due(snapshot):
            existing = set(self.existing_nat)
            self.cleanup_done()
        rendered = self.render(snapshot, full, existing)
        self.syncs += 1
        self.out.write(f"# kproxy sync {self.syncs} {'full' if full else 'partial'}\n")
        self.out.write(rendered.text)
        self.out.flush()
        nat = rendered.text.split("*nat\n", 1)[-1]
        self.existing_nat |= set(_CHAIN_LINE.findall(nat))
        self.existing_nat -= set(_DELETE_LINE.findall(nat))
        self.need_full = False
        return self.record(rendered)

    def canary_present(self) -> bool:
        return True

    def cleanup(self) -> None:
        self.existing_nat.clear()
        self.need_full = True
