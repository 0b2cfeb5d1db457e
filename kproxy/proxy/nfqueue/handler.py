"""The NFQUEUE handler: first-packet endpoint selection and the thread that serves the queues.

:class:`Decider` owns the decision for one queued packet (pure apart from its
counters and the affinity/round-robin state; unit-tested with scapy bytes, no
queue needed): parse with the fast path's parser, find the service port by
(destination, port, protocol), choose an endpoint with the service's policy and
return the mark field value of that endpoint (0: leave the packet unmarked).

- ``maglev``: Maglev over the endpoints' ``IP:port`` names (so every node with
  the same endpoints builds the same table) and the flow's 5-tuple hash; with
  ClientIP affinity the hash is the client IP's alone, so a client lands on the
  same endpoint on every node, and a record keeps it there across endpoint
  changes for the affinity timeout;
- ``rr``: round robin (upstream's userspace balancer), ClientIP affinity by record;
- odd packets (fragments, truncated or malformed headers, other protocols) and
  packets of unknown service ports are left unmarked: the nat rules' fallback
  balances them; nothing a packet holds can make :meth:`Decider.decide` raise.

Tables (Maglev, the service map) are built by :meth:`Decider.update` in the
caller's thread (the sync worker), never on the packet path, and published by
one reference assignment, which the packet thread picks up on its next packet.
Affinity records and round-robin positions carry over for the service ports
that stay; they are mutated by the packet thread only (a record pointing at a
removed endpoint is ignored and rewritten there).

:class:`QueueHandler` binds the queues (through :mod:`kproxy.kernel.nfqueue`),
serves all of them from ONE thread (the callback needs the GIL anyway, and one
thread keeps the selection state single-writer), gives every packet a verdict
(accept, marked or not) even when something fails, and keeps the counters that
:class:`NfqueueCollector` exports.

Queue bypasses (no handler bound) and fail-open accepts (queue full, or the
kernel could not deliver to the handler, with ``NFQA_CFG_F_FAIL_OPEN`` set) are
counted by no kernel counter: both packets reach the nat fallback unmarked, so
the collector reports them from the fallback rules' packet counters
(:class:`FallbackCounts`, read by the mode) minus what the handler itself left
unmarked; see :class:`NfqueueCollector` for exactly what is counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kproxy import fastpath
from kproxy.kernel.nfqueue import NfQueueError, PacketQueue, QueueStats, read_queue_stats
from kproxy.proxy.nfqueue.rules import MARK_MASK, mark_value
from kproxy.proxy.types import ServicePortName

__all__ = [
    "MAGLEV",
    "ROUND_ROBIN",
    "Decider",
    "Decision",
    "FallbackCounts",
    "LoopHandler",
    "NfqueueCollector",
    "QueueHandler",
    "ServiceSelection",
]

log = logging.getLogger(__name__)

MAGLEV: Final = "maglev"
ROUND_ROBIN: Final = "rr"
SELECTIONS: Final = (MAGLEV, ROUND_ROBIN)
DEFAULT_TABLE_SIZE: Final = 65537
_KEEP: Final = 0xFFFFFFFF & ~MARK_MASK
_PROTO: Final = {"TCP": 6, "UDP": 17}
REASONS: Final = ("truncated", "fragment", "unsupported", "malformed", "no_service", "error")
SWEEP_INTERVAL_S: Final = 10.0
STOP_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class ServiceSelection:
    """One service port for the handler: its frontends, endpoints and policy.

    ``frontends`` are packed addresses (4 or 16 bytes); ``endpoints`` are
    ``IP:port`` names, ``mark_ids`` and ``weights`` aligned with them;
    ``affinity_timeout`` is 0 without ClientIP affinity.
    """

    spn: ServicePortName
    protocol: str
    frontends: tuple[bytes, ...]
    port: int
    endpoints: tuple[str, ...]
    mark_ids: tuple[int, ...]
    weights: tuple[int, ...] = ()
    affinity_timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`Decider.explain` found: parse status, service, endpoint, mark value."""

    status: int
    service: ServicePortName | None
    endpoint: str | None
    mark: int


class _Service:
    """The packet path's view of one service port (replaced whole on updates)."""

    __slots__ = (
        "affinity",
        "by_name",
        "key",
        "maglev",
        "marked",
        "marks",
        "names",
        "rr",
        "sel",
    )

    def __init__(self, sel: ServiceSelection, maglev: Any, rr: Any, affinity: Any) -> None:
        self.sel = sel
        self.key = (sel.endpoints, sel.weights or (1,) * len(sel.endpoints))
        self.names = sel.endpoints
        self.marks = tuple(mark_value(i) for i in sel.mark_ids)
        self.by_name = dict(zip(self.names, self.marks, strict=True))
        self.maglev = maglev
        self.rr = rr
        self.affinity = affinity
        self.marked = 0


class Decider:
    """Endpoint choice for the first packet of a flow (see the module docstring).

    ``impl`` is the fast-path module to use (default: :mod:`kproxy.fastpath`'s
    choice); the benchmark passes the compiled module or the twin explicitly.
    """

    def __init__(
        self,
        selection: str = MAGLEV,
        *,
        table_size: int = DEFAULT_TABLE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        impl: ModuleType | None = None,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
        m: Any = impl if impl is not None else fastpath
        self.impl = m
        self.selection = selection
        self.table_size = table_size
        self._clock = clock
        self._parse = m.parse_packet
        self._hash64 = m.hash64
        self._seed = m.FLOW_SEED
        self._Maglev = m.Maglev
        self._RoundRobin = m.RoundRobin
        self._Affinity = m.ClientIPAffinity
        self._services: dict[tuple[bytes, int, int], _Service] = {}
        self._by_spn: dict[ServicePortName, _Service] = {}
        # Unmarked packets by reason; index = parse status (1..4), 5 no service, 6 error.
        self.unmarked = [0] * (len(REASONS) + 1)

    # -- building (sync thread) ---------------------------------------------------
    def update(self, services: Iterable[ServiceSelection]) -> None:
        """Build the tables for ``services`` and publish them in one assignment."""
        by_spn: dict[ServicePortName, _Service] = {}
        table: dict[tuple[bytes, int, int], _Service] = {}
        for sel in services:
            proto = _PROTO.get(sel.protocol)
            if proto is None or not sel.endpoints:
                continue
            svc = self._build(sel, self._by_spn.get(sel.spn))
            by_spn[sel.spn] = svc
            for ip in sel.frontends:
                table[(ip, sel.port, proto)] = svc
        # The packet thread reads self._services once per packet: it sees the old
        # map or the new one, never a mix.
        self._services = table
        self._by_spn = by_spn

    def _build(self, sel: ServiceSelection, old: _Service | None) -> _Service:
        weights = sel.weights or (1,) * len(sel.endpoints)
        same = old is not None and old.key == (sel.endpoints, weights)
        maglev = rr = None
        if self.selection == MAGLEV:
            maglev = (
                old.maglev
                if same and old is not None
                else self._Maglev(sel.endpoints, weights, self.table_size)
            )
        else:
            rr = old.rr if same and old is not None else self._RoundRobin(sel.endpoints)
        affinity = None
        if sel.affinity_timeout > 0:
            prev = old.affinity if old is not None else None
            affinity = (
                prev
                if prev is not None and prev.timeout == sel.affinity_timeout
                else self._Affinity(sel.affinity_timeout)
            )
        svc = _Service(sel, maglev, rr, affinity)
        if old is not None:
            svc.marked = old.marked
        return svc

    @property
    def services(self) -> Mapping[ServicePortName, ServiceSelection]:
        return {spn: s.sel for spn, s in self._by_spn.items()}

    def marks_by_service(self) -> dict[str, int]:
        return {str(spn): s.marked for spn, s in self._by_spn.items()}

    def loop_entries(self) -> list[tuple[Any, ...]]:
        """The published tables as ``NfqLoop.set_services`` entries (keyed by service port).

        The loop uses the Maglev and RoundRobin objects in place, so round-robin
        positions carry over exactly as they do here; affinity services are
        delegated back to :meth:`decide`.
        """
        out: list[tuple[Any, ...]] = []
        for spn, svc in self._by_spn.items():
            sel = svc.sel
            out.append(
                (
                    spn,
                    sel.frontends,
                    sel.port,
                    _PROTO[sel.protocol],
                    svc.maglev,
                    svc.rr,
                    svc.marks,
                    svc.affinity is not None,
                )
            )
        return out

    def add_marked(self, counts: Iterable[tuple[Any, int]]) -> None:
        """Fold the loop's per-service marked counts in (services gone since are dropped)."""
        for spn, n in counts:
            svc = self._by_spn.get(spn)
            if svc is not None:
                svc.marked += n

    # -- the packet path ----------------------------------------------------------
    def decide(self, buf: bytes) -> int:
        """The mark field value for the packet ``buf`` (IP header first); 0: unmarked."""
        status, _, proto, src, _, dst, dport = self._parse(buf)
        if status:
            self.unmarked[status] += 1
            return 0
        svc = self._services.get((dst, dport, proto))
        if svc is None:
            self.unmarked[5] += 1
            return 0
        svc.marked += 1
        if svc.affinity is not None:
            return self._sticky(svc, src)
        if svc.maglev is not None:
            # Parsed already, so the packet is well-formed: lookup_packet returns an index.
            return svc.marks[svc.maglev.lookup_packet(buf)]  # type: ignore[no-any-return]
        return svc.marks[svc.rr.next_index()]  # type: ignore[no-any-return]

    def _sticky(self, svc: _Service, src: bytes) -> int:
        now = self._clock()
        name = svc.affinity.get(src, now)
        mark = svc.by_name.get(name) if name is not None else None
        if mark is None:
            if svc.maglev is not None:
                i = svc.maglev.lookup(self._hash64(src, self._seed))
            else:
                i = svc.rr.next_index()
            svc.affinity.set(src, svc.names[i], now)
            mark = svc.marks[i]
        return mark

    def explain(self, buf: bytes) -> Decision:
        """:meth:`decide` plus what it found (tests, debugging; counts like ``decide``)."""
        status, _, proto, _, _, dst, dport = self._parse(buf)
        svc = self._services.get((dst, dport, proto)) if status == 0 else None
        mark = self.decide(buf)
        endpoint = None
        if svc is not None and mark:
            endpoint = next(n for n, m in svc.by_name.items() if m == mark)
        return Decision(status, svc.sel.spn if svc is not None else None, endpoint, mark)

    def sweep(self) -> int:
        """Drop expired affinity records (packet thread); returns how many."""
        now = self._clock()
        return sum(s.affinity.sweep(now) for s in self._by_spn.values() if s.affinity is not None)


QueueFactory = Callable[[int, Callable[[Any], None]], PacketQueue]


@dataclass(frozen=True, slots=True)
class FallbackCounts:
    """Packets that took the nat fallback since this process started managing the rules.

    ``by_service`` holds the service ports whose rules exist now; ``total`` also
    keeps the counts of service ports removed since (so it never decreases).
    """

    by_service: Mapping[str, int]
    total: int


class QueueHandler:
    """Serves the bound queues from one daemon thread with a :class:`Decider`."""

    def __init__(
        self,
        decider: Decider,
        queues: Sequence[int],
        factory: QueueFactory,
        *,
        stats: Callable[[], Mapping[int, QueueStats]] = read_queue_stats,
    ) -> None:
        self.decider = decider
        self.queue_nums = tuple(queues)
        self._factory = factory
        self._stats = stats
        self._queues: list[PacketQueue] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake: tuple[int, int] | None = None
        self.packets = 0
        self.pps = 0.0
        self.errors = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def publish(self) -> None:
        """Nothing to do: the callback reads the decider's tables directly."""

    def refresh(self) -> None:
        """Nothing to do: the callback counts on the decider directly."""

    # -- the callback (packet thread) -------------------------------------------
    def callback(self, pkt: Any) -> None:
        """Give ``pkt`` a verdict: accept, with the endpoint's mark when one was chosen."""
        self.packets += 1
        try:
            m = self.decider.decide(pkt.get_payload())
            if m:
                pkt.set_mark((pkt.mark & _KEEP) | m)
            pkt.accept()
        except Exception:
            # A verdict for every packet, whatever failed: unmarked, the fallback balances it.
            self.errors += 1
            self.decider.unmarked[6] += 1
            with contextlib.suppress(Exception):
                pkt.accept()

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Bind every queue (raises the binding's error) and start the thread."""
        if self._thread is not None:
            return
        try:
            for n in self.queue_nums:
                self._queues.append(self._factory(n, self.callback))
        except BaseException:
            self._close_queues()
            raise
        self._stop.clear()
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, name="kproxy-nfqueue", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._wake is not None
        fds = {q.fileno(): q for q in self._queues}
        wake = self._wake[0]
        last_t, last_n = time.monotonic(), self.packets
        next_sweep = last_t + SWEEP_INTERVAL_S
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([*fds, wake], [], [], 1.0)
            except (OSError, ValueError):
                break  # the fds were closed under us: stopping
            for fd in ready:
                q = fds.get(fd)
                if q is None:
                    continue
                try:
                    q.process_pending()
                except OSError as e:
                    log.error("NFQUEUE %d: %s", q.queue_num, e)
                    time.sleep(0.1)  # bounded retry rate on a broken socket
            now = time.monotonic()
            if now - last_t >= 1.0:
                self.pps = (self.packets - last_n) / (now - last_t)
                last_t, last_n = now, self.packets
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL_S
                try:
                    self.decider.sweep()
                except Exception:
                    log.exception("affinity sweep failed")

    def stop(self) -> None:
        """Stop the thread and unbind the queues (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            if self._wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self._wake[1], b"x")
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                # Saturated: run() never returns to the loop. Unbinding stops the
                # kernel feeding us, so the drain ends (the binding serialises
                # unbind and packet handling on the GIL).
                self._close_queues()
                thread.join(STOP_TIMEOUT_S)
        self._close_queues()
        if self._wake is not None:
            for fd in self._wake:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake = None
        self.pps = 0.0

    def _close_queues(self) -> None:
        queues, self._queues = self._queues, []
        for q in queues:
            try:
                q.close()
            except Exception:
                log.exception("cannot unbind NFQUEUE %d", q.queue_num)

    def queue_stats(self) -> dict[int, QueueStats]:
        """Kernel counters of our queues (all of them, bound or not)."""
        stats = self._stats()
        return {n: stats[n] for n in self.queue_nums if n in stats}


class LoopHandler:
    """Serves the queues with the fast path's ``NfqLoop`` (the C loop when compiled).

    Same surface as :class:`QueueHandler`. The loop owns recv → parse → select
    → verdict for Maglev and round-robin services; ClientIP-affinity services
    are delegated to :meth:`Decider.decide` (on the loop's thread, so the
    selection state stays single-writer, and :meth:`Decider.sweep` runs there
    too, between two :meth:`NfqLoop.run` calls). :meth:`publish` hands the
    decider's tables to the loop after each :meth:`Decider.update`; the loop's
    counters are folded into the decider by :meth:`refresh` (scrape time).
    """

    def __init__(
        self,
        decider: Decider,
        queues: Sequence[int],
        *,
        copy_range: int = 128,
        max_len: int = 4096,
        stats: Callable[[], Mapping[int, QueueStats]] = read_queue_stats,
    ) -> None:
        self.decider = decider
        self.queue_nums = tuple(queues)
        self._stats = stats
        self.loop: Any = decider.impl.NfqLoop(
            self.queue_nums,
            copy_range=copy_range,
            max_len=max_len,
            mark_mask=MARK_MASK,
            delegate=decider.decide,
        )
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen_unmarked = [0] * (len(REASONS) + 1)
        self._seen_errors = 0
        self.pps = 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def packets(self) -> int:
        return int(self.loop.stats()["packets"])

    @property
    def errors(self) -> int:
        c = self.loop.stats()
        return int(c["errors"]) + int(c["send_errors"])

    def publish(self) -> None:
        """Hand the decider's current tables to the loop (sync thread)."""
        with self._lock:
            self.decider.add_marked(self.loop.set_services(self.decider.loop_entries()))

    def refresh(self) -> None:
        """Fold the loop's counters into the decider's (collector, stats)."""
        with self._lock:
            self.decider.add_marked(self.loop.take_marked())
            c = self.loop.stats()
            for i, n in enumerate(c["unmarked"]):
                self.decider.unmarked[i] += n - self._seen_unmarked[i]
                self._seen_unmarked[i] = n
            # Delegate failures are not counted by reason in the loop: count them as errors.
            self.decider.unmarked[6] += c["errors"] - self._seen_errors
            self._seen_errors = c["errors"]

    def start(self) -> None:
        """Bind every queue (raises NfQueueError) and start the thread."""
        if self._thread is not None:
            return
        try:
            self.loop.open()
        except OSError as e:
            self.loop.close()
            raise NfQueueError(f"cannot bind NFQUEUE {self.queue_nums}: {e}") from e
        self.publish()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kproxy-nfqueue", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_t, last_n = time.monotonic(), 0
        next_sweep = last_t + SWEEP_INTERVAL_S
        while not self._stop.is_set():
            try:
                last_n += self.loop.run(1.0)
            except OSError as e:
                log.error("NFQUEUE %s: %s", self.queue_nums, e)
                time.sleep(0.1)  # bounded retry rate on a broken socket
            now = time.monotonic()
            if now - last_t >= 1.0:
                self.pps = last_n / (now - last_t)
                last_t, last_n = now, 0
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL_S
                try:
                    self.decider.sweep()
                except Exception:
                    log.exception("affinity sweep failed")

    def stop(self) -> None:
        """Stop the thread and unbind the queues (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self.loop.wake()
            # run() drains at most a bounded burst before it sees the wake pipe.
            thread.join(STOP_TIMEOUT_S * 2)
            if thread.is_alive():
                # Only the twin's binding can be stuck draining a saturated queue;
                # unbinding ends that (the compiled loop refuses while running).
                try:
                    self.loop.close()
                except RuntimeError:
                    log.error("NFQUEUE thread did not stop; leaving the queues bound")
                    self.pps = 0.0
                    return
                thread.join(STOP_TIMEOUT_S)
        self.loop.close()
        self.pps = 0.0

    def queue_stats(self) -> dict[int, QueueStats]:
        """Kernel counters of our queues (all of them, bound or not)."""
        stats = self._stats()
        return {n: stats[n] for n in self.queue_nums if n in stats}


class NfqueueCollector(Collector):
    """``kubeproxy_nfqueue_*``: read from the handler and the kernel at scrape time.

    Nothing is incremented per packet on a Prometheus object: the packet path
    keeps plain integers and this collector reads them.

    With ``fallback`` (the mode's reader of the nat fallback rules' counters):

    - ``kubeproxy_nfqueue_fallback_packets_total{service_port}``: connections
      (first packets: nat sees one packet per conntrack entry) that took the
      unbalanced fallback, whatever the reason;
    - ``kubeproxy_nfqueue_bypassed_packets_total``: of those, the ones the
      handler never saw: the fallback total minus the packets the handler
      accepted unmarked (``kubeproxy_nfqueue_unmarked_total``, all reasons), so
      queue bypasses while no handler is bound plus fail-open accepts (queue
      full or delivery failed; the kernel counts neither: ``queue_dropped`` and
      ``user_dropped`` only count when fail-open is off, and those packets were
      dropped, not bypassed). Not per service port: most unmarked packets have
      no service (parse failures, unknown service port). Kept monotonic; an
      unmarked packet that nat never saw (a later UDP packet or a retransmitted
      SYN of a flow whose first packet was already translated) can make it
      lag behind the true count by that many packets, never overshoot.
    """

    def __init__(
        self,
        handler: QueueHandler | LoopHandler,
        fallback: Callable[[], FallbackCounts] | None = None,
    ) -> None:
        self.handler = handler
        self.fallback = fallback
        self._bypassed = 0

    def collect(self) -> Iterable[Any]:
        h = self.handler
        h.refresh()
        packets = CounterMetricFamily(
            "kubeproxy_nfqueue_packets", "Packets given a verdict by the NFQUEUE handler"
        )
        packets.add_metric([], h.packets)
        yield packets
        marks = CounterMetricFamily(
            "kubeproxy_nfqueue_marks",
            "Packets marked with an endpoint, per service port",
            labels=["service_port"],
        )
        for spn, n in sorted(h.decider.marks_by_service().items()):
            marks.add_metric([spn], n)
        yield marks
        unmarked = CounterMetricFamily(
            "kubeproxy_nfqueue_unmarked",
            "Packets accepted unmarked (balanced by the nat fallback), by reason",
            labels=["reason"],
        )
        for i, reason in enumerate(REASONS, start=1):
            unmarked.add_metric([reason], h.decider.unmarked[i])
        yield unmarked
        pps = GaugeMetricFamily(
            "kubeproxy_nfqueue_handler_packets_per_second", "Handler verdict rate (1 s window)"
        )
        pps.add_metric([], h.pps)
        yield pps
        up = GaugeMetricFamily("kubeproxy_nfqueue_handler_up", "1 while the queues are served")
        up.add_metric([], 1.0 if h.running else 0.0)
        yield up
        stats = h.queue_stats()
        for name, doc, attr in (
            ("queue_dropped", "Packets dropped because the queue was full", "queue_dropped"),
            ("user_dropped", "Packets the kernel could not hand to the handler", "user_dropped"),
            ("queue_waiting", "Packets waiting for a verdict", "waiting"),
        ):
            fam = GaugeMetricFamily(f"kubeproxy_nfqueue_{name}", doc, labels=["queue"])
            for n, st in sorted(stats.items()):
                fam.add_metric([str(n)], float(getattr(st, attr)))
            yield fam
        if self.fallback is not None:
            yield from self._fallback_metrics(self.fallback())

    def _fallback_metrics(self, counts: FallbackCounts) -> Iterable[Any]:
        fam = CounterMetricFamily(
            "kubeproxy_nfqueue_fallback_packets",
            "Connections balanced by the nat fallback (unmarked first packet), per service port",
            labels=["service_port"],
        )
        for spn, n in sorted(counts.by_service.items()):
            fam.add_metric([spn], n)
        yield fam
        # The handler's unmarked packets also took the fallback: what is left was
        # never seen by the handler. max() keeps the counter monotonic when the
        # subtraction briefly undershoots (see the class docstring).
        self._bypassed = max(self._bypassed, counts.total - sum(self.handler.decider.unmarked))
        bypassed = CounterMetricFamily(
            "kubeproxy_nfqueue_bypassed_packets",
            "Connections that took the nat fallback without the handler seeing them"
            " (queue bypass with no handler bound, fail-open accepts)",
        )
        bypassed.add_metric([], self._bypassed)
        yield bypassed
