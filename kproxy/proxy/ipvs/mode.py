"""The thin IPVS applier: diffs the planner's :class:`IpvsPlan` against the kernel.

Owns the I/O of the IPVS mode and nothing about what the plan says (that is
:mod:`kproxy.proxy.ipvs.plan`).  Per sync:

- the kernel's virtual and real servers come from one dump over the kept
  :class:`~kproxy.kernel.ipvs_batch.IpvsBatch` socket on full syncs (and on a
  partial sync whose last read is older than ``verify_period``); other partial
  syncs diff against the model of the kernel this mode keeps, so an endpoint
  change costs the netlink operations of that change and nothing per Service;
- the differences go out as ONE batch of operations (add/edit/delete virtual
  server, add/edit/delete real server); removed TCP real servers drain first
  (:mod:`kproxy.proxy.ipvs.graceful`), which costs one destination dump of each
  service concerned;
- ipsets are synced by difference before the rules that match them: on full
  syncs all are created in one batch and read in one dump, otherwise the kept
  model says what the kernel holds; addresses on ``kube-ipvs0`` are
  bound after the IPVS batch and unbound after the rules, as upstream;
- the fixed nat/filter rules go in ONE ``iptables-restore --noflush``; on full
  syncs the jump rules from the built-in chains that ONE ``iptables-save`` lacks
  are inserted by that same restore (upstream: an ``iptables -C``/``-I`` exec per
  jump).  Both execs run on a thread of their own beside the netlink work (the
  save while planning, the restore while the IPVS batch goes out), and a sync
  waits for them before it returns;
- at the first sync, upstream's sysctls (and the IPVS timeouts, when set);
- virtual servers absent from the plan are deleted unless they are of the other
  family or inside ``--ipvs-exclude-cidrs`` (upstream's cleanLegacyService).

Invariants: a failed sync returns ``ok=False`` and makes the next one full, and
the kept model is dropped (re-read from the kernel); :meth:`IpvsMode.cleanup`
removes the virtual servers (except excluded ones), the rules, the ipsets and
``kube-ipvs0`` and is idempotent.  The kernel handles are bound to the thread
that opened them: with ``executor`` (one worker thread that opened them) every
sync and cleanup runs there, whatever thread calls.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from kproxy.errors import KProxyError
from kproxy.kernel import sysctl
from kproxy.kernel.ipset import IpsetError, IpsetVerbs
from kproxy.kernel.iptables import IptablesBackend, IptablesError
from kproxy.kernel.ipvs import IpvsError, RealServer, VirtualServer
from kproxy.kernel.ipvs_batch import ApplyResult, IpvsBulkVerbs, IpvsOneByOne, IpvsOp, OpKind
from kproxy.kernel.links import LinksError, LinksVerbs
from kproxy.proxy.core import Snapshot
from kproxy.proxy.ipvs.graceful import DEFAULT_TIMEOUT, GracefulTermination, needs_draining
from kproxy.proxy.ipvs.ipsets import SET_INFO, kernel_set_name
from kproxy.proxy.ipvs.options import IpvsOptions, sysctls
from kproxy.proxy.ipvs.plan import IpvsPlan, IpvsPlanner, PlanDelta, PlannedServer
from kproxy.proxy.ipvs.rules import (
    FILTER_CHAINS,
    JUMP_RULES,
    NAT_CHAINS,
    missing_jumps,
    with_jumps,
)
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import SyncResult, paused_gc
from kproxy.proxy.types import IPAddress

__all__ = ["IpvsMode", "IpvsSyncStats", "host_kernel_version"]

log = logging.getLogger(__name__)

_KernelModel = dict[Any, tuple[VirtualServer, dict[Any, RealServer]]]

_CHAIN_LINE: Final = re.compile(r"^:(\S+) ", re.M)
_SYNC_ERRORS: Final = (IpvsError, IpsetError, LinksError, IptablesError, sysctl.SysctlError)


def host_kernel_version(release: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of the running kernel (``6.1.0-56-amd64`` → (6, 1))."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(slots=True)
class IpvsSyncStats:
    """What one sync sent to the kernel (tests and the bench read it)."""

    full: bool = False
    kernel_read: bool = False  # the whole table was dumped
    ops: tuple[IpvsOp, ...] = ()
    messages: int = 0  # netlink requests of the batch
    round_trips: int = 0
    destination_dumps: int = 0  # fresh counters for graceful termination
    ipset_added: int = 0
    ipset_removed: int = 0
    bound: int = 0
    unbound: int = 0
    restores: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, kind: OpKind) -> int:
        return sum(1 for op in self.ops if op.kind is kind)


def _list_destinations(ipvs: IpvsBulkVerbs, vs: VirtualServer) -> list[RealServer]:
    # IpvsBatch dumps one service's destinations; the one-by-one adapter (the fake
    # and the baseline) reaches the same verb through the verbs it wraps.
    fn: Any = getattr(ipvs, "list_destinations", None)
    if fn is None and isinstance(ipvs, IpvsOneByOne):
        fn = ipvs.verbs.list_destinations
    if fn is None:
        return list(ipvs.dump().get(vs, []))
    return list(fn(vs))


class IpvsMode:
    """Applies :func:`plan_ipvs` through IPVS, ipset, link and iptables handles."""

    def __init__(
        self,
        ipvs: IpvsBulkVerbs,
        ipset: IpsetVerbs,
        links: LinksVerbs,
        iptables: IptablesBackend,
        options: IpvsOptions,
        metrics: ProxyMetrics | None = None,
        *,
        graceful_timeout: float = DEFAULT_TIMEOUT,
        verify_period: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        ensure_sysctl: Callable[[str, str], bool] = sysctl.ensure,
        set_timeouts: Callable[[int, int, int], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.ipvs = ipvs
        self.ipset = ipset
        self.links = links
        self.ipt = iptables
        self.options = options
        self.metrics = metrics
        self.verify_period = verify_period
        self.graceful = GracefulTermination(graceful_timeout, clock)
        self._clock = clock
        self._ensure_sysctl = ensure_sysctl
        self._set_timeouts = set_timeouts
        self._executor = executor
        # iptables execs beside the netlink work (one at a time: a save, then a restore).
        self._execs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kproxy-ipvs-exec")
        self._startup_node_ips = options.node_ips
        self.need_full = True
        self._started = False
        # The model of the kernel: None = unknown, read it at the next sync.
        self._kernel: _KernelModel | None = None
        self._read_at = -float("inf")
        self._sets: dict[str, set[str]] | None = None
        self._bound: set[IPAddress] | None = None
        self.last_stats = IpvsSyncStats()
        self.planner = IpvsPlanner()

    @property
    def last_plan(self) -> IpvsPlan | None:
        """The whole plan of the last sync (materialized on demand: O(N log N))."""
        return self.planner.plan() if self.planner.options is not None else None

    @property
    def name(self) -> str:
        return "ipvs"

    @property
    def family(self) -> str:
        return self.options.family

    @property
    def _link_family(self) -> Literal["ipv4", "ipv6"]:
        return "ipv6" if self.options.ipv6 else "ipv4"

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    def set_topology_labels(self, labels: tuple[tuple[str, str], ...]) -> None:
        """The Node's topology labels changed (the loop forces a full sync with it)."""
        self.options = replace(self.options, topology_labels=labels)

    # -- syncing ----------------------------------------------------------------
    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        with paused_gc():
            result: SyncResult = self._run(self._sync, snapshot, full or self.need_full)
        return result

    def _sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        stats = IpvsSyncStats(full=full)
        self.last_stats = stats
        # The iptables execs run beside the netlink work on the exec thread: the save
        # (which jump rules are missing) while planning, the restore while the IPVS
        # batch goes out.  Each exec is a process start, the costliest step of a
        # small sync; the kernel parts do not depend on each other's order.
        saved = self._execs.submit(self.ipt.save) if full else None
        jobs: list[Future[Any]] = [saved] if saved is not None else []
        try:
            return self._sync_steps(snapshot, full, stats, saved, jobs)
        finally:
            wait(jobs)  # never leave an exec running into the next sync

    def _sync_steps(
        self,
        snapshot: Snapshot,
        full: bool,
        stats: IpvsSyncStats,
        saved: Future[str] | None,
        jobs: list[Future[Any]],
    ) -> SyncResult:
        t = time.perf_counter()
        try:
            if not self._started:
                self._start()
            if full:
                self._refresh_node_ips()
            planner = self.planner
            delta = planner.update(
                snapshot.services,
                snapshot.endpoints,
                self.options,
                None if full else snapshot.changed,
            )
            stats.timings["plan"] = time.perf_counter() - t
            t = time.perf_counter()
            if full or self._kernel is None or self._clock() - self._read_at >= self.verify_period:
                self._read_kernel(full)
                stats.kernel_read = True
            # After a read the kernel may differ anywhere: diff everything against it.
            whole = stats.kernel_read or delta.full
            stats.timings["read"] = time.perf_counter() - t
            t = time.perf_counter()
            # The sets first: the rules match them, so they must exist before the restore.
            self._sync_ipsets(delta, whole, stats)
            stats.timings["ipsets"] = time.perf_counter() - t
            text = planner.restore().text
            if saved is not None:
                text = with_jumps(text, missing_jumps(saved.result()))
            restoring = self._execs.submit(self._restore, text, stats)
            jobs.append(restoring)
            t = time.perf_counter()
            ops = self._ipvs_ops(planner.servers, None if whole else delta.servers, stats)
            applied = self.ipvs.apply(ops) if ops else ApplyResult(0, 0)
            stats.ops, stats.messages, stats.round_trips = tuple(ops), *_counts(applied)
            self._after_apply(ops, applied)
            stats.timings["ipvs"] = time.perf_counter() - t
            t = time.perf_counter()
            assert self._bound is not None
            if whole:
                bind = set(planner.bind_addresses) - self._bound
                unbind = self._bound - set(planner.bind_addresses)
            else:
                bind = delta.bind_added - self._bound
                unbind = delta.bind_removed & self._bound
            if bind:
                bound = self.links.add_addresses(sorted(bind, key=int))
                self._bound |= bind - {f.address for f in bound.failures}
                stats.bound += len(bound.changed)
                bound.raise_for_failures()
            stats.timings["bind"] = time.perf_counter() - t
        except _SYNC_ERRORS as e:
            log.error("ipvs %s sync failed: %s", "full" if full else "partial", e)
            return self._failed(full, str(e), restore=False)
        t = time.perf_counter()
        try:
            restoring.result()
        except IptablesError as e:
            log.error("iptables-restore failed (%s sync): %s", "full" if full else "partial", e)
            return self._failed(full, str(e), restore=True)
        stats.timings["rules-wait"] = time.perf_counter() - t
        try:
            # Unbound after the restore, as upstream.
            if unbind:
                unbound = self.links.delete_addresses(sorted(unbind, key=int))
                self._bound -= unbind - {f.address for f in unbound.failures}
                stats.unbound += len(unbound.changed)
                unbound.raise_for_failures()
        except LinksError as e:
            log.error("cannot unbind an address from %s: %s", self.links.name, e)
            return self._failed(full, str(e), restore=False)
        if not applied.ok:
            error = "; ".join(str(f) for f in applied.failures[:5])
            log.error("ipvs: %d operation(s) failed: %s", len(applied.failures), error)
            return self._failed(full, f"ipvs: {error}", restore=False)
        self.need_full = False
        return self._record(full)

    def _restore(self, text: str, stats: IpvsSyncStats) -> None:
        """The one ``iptables-restore --noflush`` of a sync (on the exec thread)."""
        t = time.perf_counter()
        self.ipt.restore(text, noflush=True, counters=True)
        stats.restores = 1
        stats.timings["rules"] = time.perf_counter() - t

    def _start(self) -> None:
        """Upstream's NewProxier kernel settings, once (a failure retries next sync)."""
        for name, value in sysctls(self.options):
            self._ensure_sysctl(name, str(value))
        o = self.options
        if o.tcp_timeout or o.tcp_fin_timeout or o.udp_timeout:
            if self._set_timeouts is None:
                log.warning("IPVS timeouts are configured but cannot be set here; ignored")
            else:
                self._set_timeouts(o.tcp_timeout, o.tcp_fin_timeout, o.udp_timeout)
        self._started = True

    def _refresh_node_ips(self) -> None:
        # Upstream re-reads the node's addresses every sync; a full sync is enough
        # here (a new node address otherwise waits for the next full sync), and it
        # keeps a partial sync free of a dump that grows with kube-ipvs0's addresses.
        local = self.links.local_addresses(self._link_family)
        merged = list(self._startup_node_ips)
        merged += sorted((a for a in local if a not in merged), key=int)
        if tuple(merged) != self.options.node_ips:
            self.options = replace(self.options, node_ips=tuple(merged))

    def _read_kernel(self, full: bool) -> None:
        """One dump of every virtual/real server, kube-ipvs0's addresses and (full) the sets."""
        self.links.ensure_link()
        self._kernel = {
            vs.key: (vs, {rs.key: rs for rs in dests}) for vs, dests in self.ipvs.dump().items()
        }
        self._bound = self.links.list_addresses(self._link_family)
        if full:
            self._sets = None
        self._read_at = self._clock()

    def _sync_ipsets(self, delta: PlanDelta, whole: bool, stats: IpvsSyncStats) -> None:
        """Sets by difference, in batches: against the kept model of the sets (or, when
        it is unknown, ONE dump of them all); a partial sync only touches ``delta``'s sets."""
        planner = self.planner
        ipv6 = self.options.ipv6
        known = self._sets
        if known is None:
            # Upstream creates every set each sync; one batch here (idempotent), and
            # then their members in one dump instead of a request per set.
            fam: Literal["ipv4", "ipv6"] = self._link_family
            names = [kernel_set_name(info.name, ipv6) for info in SET_INFO]
            types: list[Any] = [info.set_type for info in SET_INFO]
            created = self.ipset.create_many((n, t, fam) for n, t in zip(names, types, strict=True))
            created.raise_for_failures()
            listed = self.ipset.list_all_entries()
            known = self._sets = {name: listed.get(name, set()) for name in names}
            whole = True
        if not whole:
            for info in SET_INFO:
                gone = delta.entries_removed.get(info.name)
                new = delta.entries_added.get(info.name)
                if gone or new:
                    name = kernel_set_name(info.name, ipv6)
                    self._apply_entries(
                        name,
                        known[name],
                        {str(e) for e in new or ()},
                        {str(e) for e in gone or ()},
                        stats,
                    )
            return
        for info in SET_INFO:
            name = kernel_set_name(info.name, ipv6)
            want = {str(e) for e in planner.entries(info.name)}
            have = known[name]
            if have != want:
                # _apply_entries keeps ``have`` to what took effect, even on a failure.
                self._apply_entries(name, have, want - have, have - want, stats)

    def _apply_entries(
        self, name: str, have: set[str], add: set[str], remove: set[str], stats: IpvsSyncStats
    ) -> None:
        """Batched delete then add; ``have`` (the kept model) follows what took effect."""
        if remove:
            result = self.ipset.delete_entries(name, sorted(remove))
            have -= remove - {f.entry for f in result.failures}
            stats.ipset_removed += len(result.done)
            result.raise_for_failures()
        if add:
            result = self.ipset.add_entries(name, sorted(add))
            have |= result.done
            stats.ipset_added += len(result.done)
            result.raise_for_failures()

    def _ipvs_ops(
        self,
        desired: Mapping[Any, PlannedServer],
        keys: Iterable[Any] | None,
        stats: IpvsSyncStats,
    ) -> list[IpvsOp]:
        """The operations that bring the kernel model to ``desired``: for every key
        (``keys`` None) or only for ``keys``, the servers the last update changed."""
        kernel = self._kernel
        assert kernel is not None
        ops: list[IpvsOp] = []
        removed: dict[Any, tuple[VirtualServer, list[RealServer]]] = {}
        if keys is None:
            stale = [key for key in kernel if key not in desired]
            todo: Iterable[tuple[Any, PlannedServer]] = desired.items()
        else:
            stale = [key for key in keys if key not in desired and key in kernel]
            todo = [(key, desired[key]) for key in keys if key in desired]
        for key in stale:
            kvs = kernel[key][0]
            if self.planner.may_delete(kvs):
                ops.append(IpvsOp.delete_service(kvs))
                self.graceful.forget_service(key)
        for key, planned in todo:
            vs = planned.server
            have = kernel.get(key)
            if have is None:
                ops.append(IpvsOp.add_service(vs))
                ops += [IpvsOp.add_destination(vs, rs) for rs in planned.destinations]
                self.graceful.forget_service(key)
                continue
            kvs, kdests = have
            if kvs != vs:
                ops.append(IpvsOp.edit_service(vs))
            want = {rs.key: rs for rs in planned.destinations}
            for rs_key, rs in want.items():
                current = kdests.get(rs_key)
                if current is None:
                    ops.append(IpvsOp.add_destination(vs, rs))
                elif current != rs:
                    # Weight back to 1: after a restart, or an endpoint back from draining.
                    ops.append(IpvsOp.edit_destination(vs, rs))
                self.graceful.cancel(key, rs_key)
            if len(kdests) > len(want) or any(k not in want for k in kdests):
                gone = [
                    rs
                    for k, rs in kdests.items()
                    if k not in want and not self.graceful.is_draining(key, k)
                ]
                if gone and not needs_draining(vs):
                    # UDP/SCTP: nothing to drain, delete now (and skip the counters read).
                    ops += [IpvsOp.delete_destination(vs, rs) for rs in gone]
                elif gone:
                    removed[key] = (vs, gone)
        # Fresh counters for the services with removed or draining servers only.
        for key in {*removed, *(k for k in self.graceful.services() if k in desired)}:
            vs = desired[key].server
            fresh = {rs.key: rs for rs in _list_destinations(self.ipvs, vs)}
            stats.destination_dumps += 1
            kdests = kernel[key][1]
            kdests.update({k: rs for k, rs in fresh.items() if k in kdests})
            decision = self.graceful.decide(vs, removed.get(key, (vs, []))[1], fresh)
            ops += [IpvsOp.edit_destination(vs, rs) for rs in decision.quiesce]
            ops += [IpvsOp.delete_destination(vs, rs) for rs in decision.delete]
        for key in self.graceful.services():
            if key not in desired:
                self.graceful.forget_service(key)
        return ops

    def _after_apply(self, ops: Iterable[IpvsOp], applied: ApplyResult) -> None:
        """Fold the applied operations into the model (or drop it after a failure)."""
        kernel = self._kernel
        if not applied.ok or kernel is None:
            self._kernel = None
            return
        for op in ops:
            key, rs = op.service.key, op.destination
            if op.kind is OpKind.ADD_SERVICE:
                kernel[key] = (op.service, {})
            elif op.kind is OpKind.EDIT_SERVICE:
                kernel[key] = (op.service, kernel[key][1])
            elif op.kind is OpKind.DELETE_SERVICE:
                kernel.pop(key, None)
            elif rs is not None and op.kind is OpKind.DELETE_DESTINATION:
                kernel[key][1].pop(rs.key, None)
            elif rs is not None:
                kernel[key][1][rs.key] = rs

    def _record(self, full: bool) -> SyncResult:
        m, fam = self.metrics, self.family
        restore = self.planner.restore()
        n_int, n_ext = self.planner.no_local_endpoints
        rules = {"filter": restore.filter_rules, "nat": restore.nat_rules}
        if m is not None:
            m.rules_synced(fam, rules, no_local=(n_int, n_ext))
        return SyncResult(full=full, ok=True, rules_written=rules, rules_total=rules)

    def _failed(self, full: bool, error: str, *, restore: bool) -> SyncResult:
        self.need_full = True
        self._kernel = None
        self._sets = None
        self._bound = None
        if restore and self.metrics is not None:
            self.metrics.restore_failed(self.family, partial=not full)
        return SyncResult(full=full, ok=False, error=error)

    # -- cleanup ----------------------------------------------------------------
    def cleanup(self) -> None:
        self._run(self._cleanup)

    def _cleanup(self) -> None:
        """Remove virtual servers (not excluded ones), rules, sets and kube-ipvs0."""
        errors: list[str] = []
        try:
            ours = [vs for vs in self.ipvs.dump() if self._may_delete(vs)]
            errors += [str(f) for f in self.ipvs.apply(map(IpvsOp.delete_service, ours)).failures]
        except IpvsError as e:
            errors.append(str(e))
        for jump in JUMP_RULES:
            try:
                # -C on a rule whose target chain is gone is an error, not "absent".
                if self.ipt.chain_exists(jump.table, jump.chain):
                    self.ipt.delete_rule(jump.table, jump.source, jump.rule_args())
            except IptablesError as e:
                errors.append(str(e))
        for table, owned in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            try:
                chains = [c for c in _CHAIN_LINE.findall(self.ipt.save(table)) if c in owned]
                if chains:
                    # Flush all first: our chains jump to each other; -X needs no references.
                    lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
                    lines += [f"-X {c}" for c in chains]
                    text = "\n".join([*lines, "COMMIT", ""])
                    self.ipt.restore(text, noflush=True, counters=False)
            except IptablesError as e:
                errors.append(str(e))
        try:
            existing = self.ipset.list_sets()
            for info in SET_INFO:
                name = kernel_set_name(info.name, self.options.ipv6)
                if name in existing:
                    self.ipset.destroy(name)
        except IpsetError as e:
            errors.append(str(e))
        try:
            self.links.delete_link()
        except LinksError as e:
            errors.append(str(e))
        self.need_full = True
        self._started = False
        self._kernel, self._sets, self._bound = None, None, None
        self.graceful.clear()
        for problem in errors:
            log.error("ipvs cleanup: %s", problem)
        if errors:
            raise KProxyError(f"ipvs cleanup left work undone ({len(errors)} errors)")

    def _may_delete(self, vs: VirtualServer) -> bool:
        if (vs.address.version == 6) != self.options.ipv6:
            return False
        return not any(vs.address in net for net in self.options.exclude_cidrs)

    def close(self) -> None:
        """Close the kernel handles (on their thread) and stop the worker thread."""

        def close_all() -> None:
            for handle in (self.ipvs, self.ipset, self.links):
                try:
                    handle.close()
                except (KProxyError, OSError) as e:
                    log.warning("closing %s: %s", type(handle).__name__, e)

        self._run(close_all)
        self._execs.shutdown(wait=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _counts(applied: ApplyResult) -> tuple[int, int]:
    return applied.messages, applied.round_trips
