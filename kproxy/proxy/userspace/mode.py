"""The userspace mode: proxy sockets per service port, steered to by portal rules.

Owns :class:`UserspaceMode` (the :class:`~kproxy.proxy.mode.Mode` contract) and
:class:`DataPlane`, the event loop in its own thread that owns every proxy
socket, the load balancer and the relays.

A sync, called from any thread but the data plane's (the proxy loop calls it in
a worker thread):

1. computes the wanted service ports (TCP and UDP; SCTP is logged and skipped)
   and their endpoints (Ready, else Serving+Terminating, per traffic policy);
2. on the data plane: updates the balancer and opens a proxy socket for every
   new service port (a socket that cannot be opened is logged, skipped, and
   fails the sync so that it is retried, without blocking the others);
3. on full syncs ensures the jump rules from the built-in chains, then writes
   *all* portal rules with ONE ``iptables-restore --noflush`` (upstream ran one
   ``iptables`` per rule);
4. only after the restore succeeded, closes the sockets of removed service ports
   (their rules are gone, so nothing is steered to a closed port); a failed restore
   keeps them and makes the next sync full.

A service port keeps its proxy socket as long as it exists (upstream reopened it
on any change; with whole-ruleset restores there is no need), so a changed
Service does not disturb its clients. Endpoint changes apply to new connections;
relayed connections survive the removal of their service port and end with
:meth:`UserspaceMode.close` / :meth:`UserspaceMode.cleanup`.

Not honoured, as upstream: the external traffic policy (the proxy cannot tell
where a redirected connection entered) beyond choosing endpoints by
:func:`~kproxy.proxy.topology.categorize_endpoints`, and source IPs (backends
see the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from kproxy.kernel.iptables import IptablesBackend, IptablesError, RulePosition
from kproxy.proxy.core import Snapshot
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import SyncResult
from kproxy.proxy.topology import categorize_endpoints
from kproxy.proxy.types import IPV4, IPAddress, ServicePortInfo, ServicePortName
from kproxy.proxy.userspace.components import OwnedRelay, new_load_balancer, new_relay
from kproxy.proxy.userspace.loadbalancer import LoadBalancer
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.portals import (
    ANY_IPV4,
    FILTER_CHAINS,
    JUMPS,
    NAT_CHAINS,
    Portal,
    PortalOptions,
    render_portals,
)
from kproxy.proxy.userspace.proxysocket import (
    DIAL_TIMEOUTS,
    PortAllocator,
    PortRangeError,
    TcpProxySocket,
    open_listener,
    raise_nofile_limit,
)
from kproxy.proxy.userspace.relay import Relay
from kproxy.proxy.userspace.udp import DEFAULT_MAX_CLIENTS, DEFAULT_UDP_TIMEOUT, UdpProxySocket

__all__ = ["DataPlane", "UserspaceMode", "UserspaceOptions", "cleanup_rules"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ProxySocket = TcpProxySocket | UdpProxySocket
Wanted = dict[ServicePortName, tuple[ServicePortInfo, tuple[str, ...]]]

CALL_TIMEOUT_S: Final = 60.0
_CHAIN_LINE: Final = re.compile(r"^:(\S+) ", re.M)


@dataclass(frozen=True, slots=True)
class UserspaceOptions:
    """The userspace mode's flags (``--bind-address``, ``--proxy-port-range``, ``--udp-timeout``,
    and kproxy's ``--userspace-relay`` and ``--userspace-lb``).

    ``host_ip`` is where the node's own traffic is DNATed when ``listen_ip`` is
    unspecified: a local, non-loopback address (the node IP). ``relay`` and
    ``load_balancer`` name the parts of :mod:`.components` (a relay or balancer
    injected into :class:`UserspaceMode` wins over them).
    """

    host_ip: IPAddress | None = None
    listen_ip: IPAddress = ANY_IPV4
    node_name: str = ""
    port_range: str = ""
    udp_timeout: float = DEFAULT_UDP_TIMEOUT
    udp_max_clients: int = DEFAULT_MAX_CLIENTS
    dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS
    raise_nofile: bool = True
    topology_labels: tuple[tuple[str, str], ...] = ()
    relay: str = "auto"
    load_balancer: str = "rr"


class DataPlane:
    """An asyncio loop in a daemon thread; :meth:`call` runs a coroutine on it and waits."""

    def __init__(self, name: str = "kproxy-userspace") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the data plane is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("DataPlane.call from the data-plane thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=CALL_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None


class UserspaceMode:
    """Proxy sockets + portal rules for one IPv4 node."""

    def __init__(
        self,
        ipt: IptablesBackend,
        options: UserspaceOptions,
        metrics: ProxyMetrics | None = None,
        *,
        load_balancer: LoadBalancer | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.ipt = ipt
        self.options = options
        self.portal_options = PortalOptions(options.listen_ip, options.host_ip)
        self.metrics = metrics
        self.us_metrics = UserspaceMetrics(metrics.registry if metrics is not None else None)
        self.lb: LoadBalancer = load_balancer or new_load_balancer(options.load_balancer)
        # An injected relay belongs to the caller; one made here is made when the
        # data plane starts (a splice relay owns a thread) and closed when it stops.
        self._relay: Relay | None = relay
        self._owned_relay: OwnedRelay | None = None
        self.allocator = PortAllocator(options.port_range)
        self.plane = DataPlane()
        self.need_full = True
        self._proxies: dict[ServicePortName, ProxySocket] = {}
        self._skipped: set[ServicePortName] = set()
        self._lock = threading.Lock()  # one sync/cleanup at a time

    @property
    def name(self) -> str:
        return "userspace"

    @property
    def relay(self) -> Relay:
        """The relay proxy sockets hand connected pairs to (made on first use)."""
        if self._relay is None:
            self._owned_relay = new_relay(self.options.relay, self.options.dial_timeouts)
            self._relay = self._owned_relay
            log.info("userspace relay: %s", type(self._owned_relay).__name__)
        return self._relay

    def set_topology_labels(self, labels: tuple[tuple[str, str], ...]) -> None:
        """The Node's topology labels changed (the loop forces a full sync with it)."""
        self.options = replace(self.options, topology_labels=labels)

    # -- sync ------------------------------------------------------------------
    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        with self._lock:
            return self._sync(snapshot, full or self.need_full)

    def _sync(self, snapshot: Snapshot, full: bool) -> SyncResult:
        wanted = self._wanted(snapshot)
        if not self.plane.running:
            if self.options.raise_nofile:
                raise_nofile_limit()
            _ = self.relay  # made here, off the data plane, before any socket needs it
            self.plane.start()
        try:
            ports, problems = self.plane.call(self._open(wanted))
        except Exception as e:  # a stuck or broken data plane: report, retry fully
            log.exception("userspace data plane did not apply the sync")
            self.need_full = True
            return SyncResult(full=full, ok=False, error=f"data plane: {e!r}")
        portals = [Portal(spn, wanted[spn][0], port) for spn, port in ports.items()]
        rendered = render_portals(portals, self.portal_options)
        try:
            if full:
                self.ensure_jumps()
            self.ipt.restore(rendered.text, noflush=True, counters=False)
        except IptablesError as e:
            log.error("userspace portals (%s sync): %s", "full" if full else "partial", e)
            return self._failed(full, str(e))
        try:
            self.plane.call(self._close_removed(set(wanted)))
        except Exception as e:
            log.exception("userspace data plane did not close removed proxy sockets")
            problems.append(f"data plane: {e!r}")
        self.need_full = bool(problems)
        counts = {"filter": rendered.filter_rules, "nat": rendered.nat_rules}
        if self.metrics is not None:
            self.metrics.rules_synced(IPV4, counts)
        return SyncResult(
            full=full,
            ok=not problems,
            rules_written=counts,
            rules_total=counts,
            error="; ".join(problems),
        )

    def _failed(self, full: bool, error: str) -> SyncResult:
        self.need_full = True
        if self.metrics is not None:
            self.metrics.restore_failed(IPV4, partial=not full)
        return SyncResult(full=full, ok=False, error=error)

    def _wanted(self, snapshot: Snapshot) -> Wanted:
        labels = dict(self.options.topology_labels)
        wanted: Wanted = {}
        for spn, info in snapshot.services.items():
            if info.protocol not in ("TCP", "UDP"):
                if spn not in self._skipped:
                    log.error(
                        "%s: the userspace proxy carries TCP and UDP only, not %s",
                        spn,
                        info.protocol,
                    )
                    self._skipped.add(spn)
                continue
            eps = categorize_endpoints(
                snapshot.endpoints.get(spn, ()), info, self.options.node_name, labels
            ).all_reachable
            wanted[spn] = (info, tuple(ep.endpoint for ep in eps))
        return wanted

    def ensure_jumps(self) -> None:
        for jump in JUMPS:
            self.ipt.ensure_chain(jump.table, jump.chain)
            position = RulePosition.PREPEND if jump.prepend else RulePosition.APPEND
            self.ipt.ensure_rule(position, jump.table, jump.source, jump.rule_args())

    def canary_present(self) -> bool:
        """False when our chains vanished (someone flushed the tables): resync fully."""
        try:
            return self.ipt.chain_exists("nat", NAT_CHAINS[0]) and self.ipt.chain_exists(
                "filter", FILTER_CHAINS[0]
            )
        except IptablesError as e:
            log.error("cannot check the portal chains: %s", e)
            return False

    # -- on the data plane -------------------------------------------------------
    async def _open(self, wanted: Wanted) -> tuple[dict[ServicePortName, int], list[str]]:
        problems: list[str] = []
        for spn, (info, endpoints) in sorted(wanted.items()):
            # Balancer first: a connection accepted right after start() needs it.
            self.lb.new_service(spn, info.session_affinity_client_ip, info.sticky_max_age_seconds)
            self.lb.set_endpoints(spn, endpoints)
            self.lb.cleanup_stale_sticky_sessions(spn)
            if spn in self._proxies:
                existing = self._proxies[spn]
                if isinstance(existing, TcpProxySocket):
                    existing.refresh()  # new endpoints/affinity for the in-loop accept path
                continue
            try:
                proxy = self._new_proxy(spn)
            except (OSError, PortRangeError) as e:
                log.error("%s: cannot open a proxy socket: %s", spn, e)
                problems.append(f"{spn}: {e}")
                continue
            proxy.start()
            self._proxies[spn] = proxy
            self.us_metrics.proxy_sockets.labels(protocol=proxy.protocol).inc()
            log.info("%s: proxy port %d (%s)", spn, proxy.port, proxy.protocol)
        ports = {spn: p.port for spn, p in self._proxies.items() if spn in wanted}
        return ports, problems

    def _new_proxy(self, spn: ServicePortName) -> ProxySocket:
        sock = open_listener(spn.protocol, self.options.listen_ip, self.allocator)
        if spn.protocol == "TCP":
            return TcpProxySocket(
                spn,
                sock,
                self.lb,
                self.relay,
                self.us_metrics,
                dial_timeouts=self.options.dial_timeouts,
            )
        return UdpProxySocket(
            spn,
            sock,
            self.lb,
            self.us_metrics,
            timeout=self.options.udp_timeout,
            max_clients=self.options.udp_max_clients,
        )

    async def _close_removed(self, keep: set[ServicePortName], *, abort: bool = False) -> None:
        for spn in [s for s in self._proxies if s not in keep]:
            proxy = self._proxies.pop(spn)
            await proxy.close(abort=abort)
            self.allocator.release(proxy.protocol, proxy.port)
            self.lb.delete_service(spn)
            self.us_metrics.proxy_sockets.labels(protocol=proxy.protocol).dec()
            log.info("%s: closed proxy port %d", spn, proxy.port)
        if abort:
            self.relay.abort_all()
            # Give the aborted relays one loop turn to close their sockets.
            for _ in range(100):
                if self.relay.active == 0:
                    break
                await asyncio.sleep(0.01)

    async def _stats(self) -> dict[str, Any]:
        return {
            "ports": {str(spn): [p.protocol, p.port] for spn, p in self._proxies.items()},
            "relayed": self.relay.active,
            "udp_clients": sum(
                p.client_count for p in self._proxies.values() if isinstance(p, UdpProxySocket)
            ),
        }

    def stats(self) -> Mapping[str, Any]:
        """Proxy ports, relayed connections and UDP associations (tests, debugging)."""
        if not self.plane.running:
            return {"ports": {}, "relayed": 0, "udp_clients": 0}
        return self.plane.call(self._stats())

    # -- shutdown ----------------------------------------------------------------
    def close(self) -> None:
        """Close every socket and relayed connection and stop the data plane; rules stay."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.plane.running:
            with contextlib.suppress(Exception):
                self.plane.call(self._close_removed(set(), abort=True))
            self.plane.stop()
        if self._owned_relay is not None:
            # Stops a splice relay's thread (resetting any pair still relayed).
            self._owned_relay.close()
            self._owned_relay = self._relay = None
        self.need_full = True

    def cleanup(self) -> None:
        """:meth:`close`, then remove the jump rules and the portal chains (idempotent)."""
        with self._lock:
            self._close()
            cleanup_rules(self.ipt)


def cleanup_rules(ipt: IptablesBackend) -> None:
    """Remove the userspace mode's jump rules and chains (``kproxy proxy --cleanup``).

    Needs no mode instance (and no node IP); raises IptablesError after trying everything.
    """
    errors: list[str] = []
    for jump in JUMPS:
        try:
            # -C on a rule whose target chain is gone is an error, not "absent".
            if ipt.chain_exists(jump.table, jump.chain):
                ipt.delete_rule(jump.table, jump.source, jump.rule_args())
        except IptablesError as e:
            errors.append(str(e))
    for table, ours in (("filter", FILTER_CHAINS), ("nat", NAT_CHAINS)):
        try:
            present = set(_CHAIN_LINE.findall(ipt.save(table)))
            chains = [c for c in ours if c in present]
            if not chains:
                continue
            lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
            lines += [f"-X {c}" for c in chains]
            ipt.restore("\n".join([*lines, "COMMIT", ""]), noflush=True, counters=False)
        except IptablesError as e:
            errors.append(str(e))
    for problem in errors:
        log.error("userspace cleanup: %s", problem)
    if errors:
        raise IptablesError(f"userspace cleanup left work undone ({len(errors)} errors)")
