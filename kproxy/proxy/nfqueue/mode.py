"""The userspace mode's NFQUEUE data path: the kernel forwards, userspace picks the endpoint.

Owns :class:`NfqueueMode` (the :class:`~kproxy.proxy.mode.Mode` contract;
``--proxy-mode userspace --userspace-datapath nfqueue``), its options and the
stable endpoint ids behind the marks.

A sync (from the proxy loop's worker thread):

1. computes the wanted service ports (TCP and UDP with reachable endpoints, per
   traffic policy and topology; SCTP is logged once and skipped);
2. gives each endpoint a mark id that it keeps as long as it stays (so an
   endpoint change never renumbers the others); a new endpoint gets the lowest
   id that neither the current nor the new set uses, so an id freed in this
   sync cannot be reused before the handler stopped using it;
3. on full syncs ensures the jumps from the built-in chains, then writes all
   mangle and nat rules with ONE ``iptables-restore --noflush`` (stale chains
   of ours deleted in it);
4. only after the restore succeeded, publishes the new selection tables to the
   handler (between the two, a packet marked for a removed endpoint matches no
   mark rule and takes the fallback, which only holds live endpoints), and
   binds the queues on first use.

Bypass accounting: every restore rewrites our chains, which resets their
packet counters, so the sync's one ``iptables-save -c -t nat`` (the one that
lists the existing chains) also reads the fallback rules' counters, and after a
successful restore they are folded into a running total.
:meth:`NfqueueMode.fallback_packets` (the collector, at scrape time) adds the
live counters from at most one more save per :data:`FALLBACK_CACHE_S`. A proxy
that starts on rules left by its predecessor thus reports the connections that
took the fallback while no proxy was running (queue bypass) at its first sync.
Only packets counted between that save and the restore (a few milliseconds per
sync) are lost.

A failed restore keeps the old rules and the old tables and makes the next sync
full. :meth:`NfqueueMode.close` unbinds the queues and keeps the rules: with
``--queue-bypass`` new flows then take the kernel fallback and established
ones never noticed (conntrack carries them).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from kproxy.kernel.iptables import IptablesBackend, IptablesError, RulePosition
from kproxy.kernel.nfqueue import DEFAULT_COPY_RANGE, DEFAULT_MAX_LEN, NfQueueError
from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.core import ProxyCore, Snapshot
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import SyncResult
from kproxy.proxy.nfqueue.collector import FallbackCounts, NfqueueCollector
from kproxy.proxy.nfqueue.decider import DEFAULT_TABLE_SIZE, MAGLEV, Decider, ServiceSelection
from kproxy.proxy.nfqueue.handler import LoopHandler, QueueFactory, QueueHandler
from kproxy.proxy.nfqueue.rules import (
    JUMPS,
    MANGLE_CHAIN,
    MAX_ENDPOINT_ID,
    NAT_CHAINS,
    EndpointRule,
    RuleOptions,
    ServiceRule,
    fallback_counters,
    owned_chain,
    render,
)
from kproxy.proxy.topology import categorize_endpoints
from kproxy.proxy.types import IPV4, ServicePortInfo, ServicePortName

__all__ = [
    "DEFAULT_AFFINITY_SECONDS",
    "NfqueueMode",
    "NfqueueOptions",
    "cleanup_rules",
    "nfqueue_options",
]

log = logging.getLogger(__name__)

DEFAULT_AFFINITY_SECONDS: Final = 10800
_CHAIN_LINE: Final = re.compile(r"^:(\S+) ", re.M)
# A scrape reads the live fallback counters at most this often (one iptables-save each).
FALLBACK_CACHE_S: Final = 1.0
# A scrape waits at most this long for a running sync before serving cached counts.
FALLBACK_LOCK_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class NfqueueOptions:
    """``--nfqueue-queues``, ``--nfqueue-selection`` and the masquerade flags."""

    node_name: str = ""
    first_queue: int = 0
    last_queue: int = 0
    selection: str = MAGLEV
    masquerade_bit: int = 14
    masquerade_all: bool = False
    cluster_cidr: str = ""
    random_fully: bool = False
    copy_range: int = DEFAULT_COPY_RANGE
    max_len: int = DEFAULT_MAX_LEN
    table_size: int = DEFAULT_TABLE_SIZE
    topology_labels: tuple[tuple[str, str], ...] = ()

    def rule_options(self) -> RuleOptions:
        return RuleOptions(
            first_queue=self.first_queue,
            last_queue=self.last_queue,
            masquerade_mark=f"0x{1 << self.masquerade_bit:08x}",
            masquerade_all=self.masquerade_all,
            cluster_cidr=self.cluster_cidr,
            random_fully=self.random_fully,
        )


def nfqueue_options(cfg: ProxyConfig, core: ProxyCore, *, random_fully: bool) -> NfqueueOptions:
    """The data path's options from the proxy's flags."""
    first, last = cfg.nfqueue_queue_range()
    return NfqueueOptions(
        node_name=core.node_name,
        first_queue=first,
        last_queue=last,
        selection=cfg.nfqueue_selection,
        masquerade_bit=cfg.masquerade_bit,
        masquerade_all=cfg.masquerade_all,
        # One CIDR can be negated in one rule; with several, off-cluster detection
        # would need one chain per family of CIDRs (upstream's detector takes one too).
        cluster_cidr=cfg.cluster_cidrs[0] if len(cfg.cluster_cidrs) == 1 else "",
        random_fully=random_fully,
        topology_labels=core.topology_labels(core.node),
    )


Wanted = dict[ServicePortName, tuple[ServicePortInfo, tuple[tuple[str, str, int], ...]]]


class NfqueueMode:
    """Mark-by-NFQUEUE, DNAT-by-mark for one IPv4 node."""

    def __init__(
        self,
        ipt: IptablesBackend,
        options: NfqueueOptions,
        metrics: ProxyMetrics | None = None,
        *,
        queue_factory: QueueFactory | None = None,
    ) -> None:
        self.ipt = ipt
        self.options = options
        self.metrics = metrics
        self.decider = Decider(options.selection, table_size=options.table_size)
        queues = list(range(options.first_queue, options.last_queue + 1))
        self.handler: QueueHandler | LoopHandler
        if queue_factory is not None:
            # Tests hand in fake queues: the python-netfilterqueue callback path.
            self.handler = QueueHandler(self.decider, queues, queue_factory)
        else:
            # The fast path's NfqLoop: C-owned recv → verdict when compiled, the
            # netfilterqueue twin otherwise.
            self.handler = LoopHandler(
                self.decider, queues, copy_range=options.copy_range, max_len=options.max_len
            )
        self.need_full = True
        self._ids: dict[ServicePortName, dict[str, int]] = {}
        self._skipped: set[ServicePortName] = set()
        self._lock = threading.Lock()
        # Fallback packets folded at syncs (the restore zeroes the kernel's
        # counters), the folded counts of service ports gone since, and the last
        # live reading: (folded, gone, live) replaced as ONE tuple so that a
        # reader that did not get the lock never pairs a new fold with an old
        # live reading (that would count a sync's packets twice).
        self._fallback: tuple[dict[str, int], int, dict[str, int]] = ({}, 0, {})
        self._fallback_read_at = float("-inf")
        if metrics is not None:
            metrics.registry.register(
                NfqueueCollector(self.handler, fallback=self.fallback_packets)
            )

    @property
    def name(self) -> str:
        return "userspace"

    @property
    def datapath(self) -> str:
        return "nfqueue"

    def set_topology_labels(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.options = replace(self.options, topology_labels=labels)

    # -- sync ------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        with self._lock:
            return self._sync(snapshot, full or self.need_full)

    def _sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        wanted = self._wanted(snapshot)
        ids = self._assign_ids(wanted)
        rules = [
            self._service_rule(spn, info, eps, ids[spn]) for spn, (info, eps) in wanted.items()
        ]
        try:
            saved = self.ipt.save("nat", counters=True)
            existing = [("nat", c) for c in _CHAIN_LINE.findall(saved)]
            if full:
                self.ensure_jumps()
            rendered = render(rules, self.options.rule_options(), existing)
            self.ipt.restore(rendered.text, noflush=True, counters=False)
        except IptablesError as e:
            log.error("nfqueue rules (%s sync): %s", "full" if full else "partial", e)
            return self._failed(full, str(e))
        self._fold_fallback(fallback_counters(saved), {str(spn) for spn in wanted})
        self._ids = ids
        self.decider.update(self._selections(wanted, ids))
        self.handler.publish()
        problems: list[str] = []
        if not self.handler.running:
            try:
                self.handler.start()
            except NfQueueError as e:
                log.error("%s", e)
                problems.append(str(e))
        self.need_full = bool(problems)
        counts = {"mangle": rendered.mangle_rules, "nat": rendered.nat_rules}
        if self.metrics is not None:
            self.metrics.rules_synced(IPV4, counts)
        return SyncResult(
            full=full,
            ok=not problems,
            rules_written=counts,
            rules_total=counts,
            error="; ".join(problems),
            deleted_chains=rendered.deleted_chains,
        )

    def _fold_fallback(self, counted: Mapping[str, int], kept: set[str]) -> None:
        """Add the counters the restore just zeroed; forget service ports no longer wanted."""
        folded, gone, _ = self._fallback
        merged = dict(folded)
        for name, n in counted.items():
            merged[name] = merged.get(name, 0) + n
        gone += sum(n for name, n in merged.items() if name not in kept)
        self._fallback = ({k: v for k, v in merged.items() if k in kept}, gone, {})
        self._fallback_read_at = float("-inf")

    def fallback_packets(self) -> FallbackCounts:
        """Packets that took the fallback (folded + live counters); at most one save per call."""
        if self._lock.acquire(timeout=FALLBACK_LOCK_TIMEOUT_S):
            try:
                now = time.monotonic()
                if now - self._fallback_read_at >= FALLBACK_CACHE_S:
                    self._fallback_read_at = now
                    try:
                        live = fallback_counters(self.ipt.save("nat", counters=True))
                    except IptablesError as e:
                        log.warning("cannot read the nfqueue fallback counters: %s", e)
                    else:
                        folded, gone, _ = self._fallback
                        self._fallback = (folded, gone, live)
            finally:
                self._lock.release()
        folded, gone, live = self._fallback
        by_service = dict(folded)
        for name, n in live.items():
            by_service[name] = by_service.get(name, 0) + n
        return FallbackCounts(by_service, gone + sum(by_service.values()))

    def _failed(self, full: bool, error: str) -> SyncResult:
        self.need_full = True
        if self.metrics is not None:
            self.metrics.restore_failed(IPV4, partial=not full)
        return SyncResult(full=full, ok=False, error=error)

    def _wanted(self, snapshot: Snapshot) -> Wanted:
        labels = dict(self.options.topology_labels)
        wanted: Wanted = {}
        for spn, info in sorted(snapshot.services.items()):
            if info.protocol not in ("TCP", "UDP"):
                if spn not in self._skipped:
                    log.error("%s: the nfqueue data path carries TCP and UDP only", spn)
                    self._skipped.add(spn)
                continue
            eps = categorize_endpoints(
                snapshot.endpoints.get(spn, ()), info, self.options.node_name, labels
            ).all_reachable
            # Sorted by IP:port: the Maglev backend names, identical on every node.
            endpoints = tuple(sorted((ep.endpoint, ep.ip, ep.port) for ep in eps))
            wanted[spn] = (info, endpoints)
        return wanted

    def _assign_ids(self, wanted: Wanted) -> dict[ServicePortName, dict[str, int]]:
        out: dict[ServicePortName, dict[str, int]] = {}
        for spn, (_, eps) in wanted.items():
            old = self._ids.get(spn, {})
            names = [name for name, _, _ in eps]
            new = {name: old[name] for name in names if name in old}
            taken = set(old.values()) | set(new.values())
            free = (i for i in range(1, MAX_ENDPOINT_ID + 1) if i not in taken)
            for name in names:
                if name in new:
                    continue
                i = next(free, None)
                if i is None:
                    log.error(
                        "%s: more than %d endpoints; %s is reached only unmarked",
                        spn,
                        MAX_ENDPOINT_ID,
                        name,
                    )
                    continue
                new[name] = i
            out[spn] = new
        return out

    @staticmethod
    def _service_rule(
        spn: ServicePortName,
        info: ServicePortInfo,
        eps: tuple[tuple[str, str, int], ...],
        ids: Mapping[str, int],
    ) -> ServiceRule:
        external = tuple(str(ip) for ip in (*info.external_ips, *info.load_balancer_vips))
        return ServiceRule(
            spn=spn,
            protocol=info.protocol,
            cluster_ip=str(info.cluster_ip),
            port=info.port,
            external=external,
            endpoints=tuple(EndpointRule(n, ip, port, ids[n]) for n, ip, port in eps if n in ids),
        )

    def _selections(
        self, wanted: Wanted, ids: Mapping[ServicePortName, Mapping[str, int]]
    ) -> list[ServiceSelection]:
        out: list[ServiceSelection] = []
        for spn, (info, eps) in wanted.items():
            names = tuple(n for n, _, _ in eps if n in ids[spn])
            frontends = (info.cluster_ip, *info.external_ips, *info.load_balancer_vips)
            timeout = 0.0
            if info.session_affinity_client_ip:
                timeout = float(info.sticky_max_age_seconds or DEFAULT_AFFINITY_SECONDS)
            out.append(
                ServiceSelection(
                    spn=spn,
                    protocol=info.protocol,
                    frontends=tuple(ipaddress.ip_address(ip).packed for ip in frontends),
                    port=info.port,
                    endpoints=names,
                    mark_ids=tuple(ids[spn][n] for n in names),
                    weights=(1,) * len(names),
                    affinity_timeout=timeout,
                )
            )
        return out

    def ensure_jumps(self) -> None:
        for jump in JUMPS:
            self.ipt.ensure_chain(jump.table, jump.chain)
            self.ipt.ensure_rule(RulePosition.PREPEND, jump.table, jump.source, jump.rule_args())

    def canary_present(self) -> bool:
        """False when our chains vanished (someone flushed the tables): resync fully."""
        try:
            return self.ipt.chain_exists("mangle", MANGLE_CHAIN) and self.ipt.chain_exists(
                "nat", NAT_CHAINS[0]
            )
        except IptablesError as e:
            log.error("cannot check the nfqueue chains: %s", e)
            return False

    def stats(self) -> Mapping[str, Any]:
        """Handler counters and the kernel's queue counters (tests, debugging)."""
        self.handler.refresh()
        return {
            "running": self.handler.running,
            "loop": type(self.handler).__name__,
            "packets": self.handler.packets,
            "errors": self.handler.errors,
            "marks": self.decider.marks_by_service(),
            "unmarked": list(self.decider.unmarked[1:]),
            "queues": {n: s.queue_dropped for n, s in self.handler.queue_stats().items()},
        }

    # -- shutdown ----------------------------------------------------------------
    def close(self) -> None:
        """Unbind the queues; the rules stay (bypass + fallback carry new flows)."""
        with self._lock:
            self.handler.stop()
            self.need_full = True

    def cleanup(self) -> None:
        """:meth:`close`, then remove the jumps and every chain of ours (idempotent)."""
        self.close()
        with self._lock:
            cleanup_rules(self.ipt)


def cleanup_rules(ipt: IptablesBackend) -> None:
    """Remove the nfqueue data path's jumps and chains; raises IptablesError after trying all."""
    errors: list[str] = []
    for jump in JUMPS:
        try:
            # -C on a rule whose target chain is gone is an error, not "absent".
            if ipt.chain_exists(jump.table, jump.chain):
                ipt.delete_rule(jump.table, jump.source, jump.rule_args())
        except IptablesError as e:
            errors.append(str(e))
    for table in ("mangle", "nat"):
        try:
            chains = [c for c in _CHAIN_LINE.findall(ipt.save(table)) if owned_chain(table, c)]
            if not chains:
                continue
            lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
            lines += [f"-X {c}" for c in chains]
            ipt.restore("\n".join([*lines, "COMMIT", ""]), noflush=True, counters=False)
        except IptablesError as e:
            errors.append(str(e))
    for problem in errors:
        log.error("nfqueue cleanup: %s", problem)
    if errors:
        raise IptablesError(f"nfqueue cleanup left work undone ({len(errors)} errors)")
