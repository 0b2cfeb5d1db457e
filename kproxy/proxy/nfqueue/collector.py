"""``kubeproxy_nfqueue_*`` metrics: :class:`NfqueueCollector`, read at scrape time.

Queue bypasses (no handler bound) and fail-open accepts (queue full, or the
kernel could not deliver to the handler, with ``NFQA_CFG_F_FAIL_OPEN`` set) are
counted by no kernel counter: both packets reach the nat fallback unmarked, so
the collector reports them from the fallback rules' packet counters
(:class:`FallbackCounts`, read by the mode) minus what the handler itself left
unmarked; see :class:`NfqueueCollector` for exactly what is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kproxy.proxy.nfqueue.decider import REASONS
from kproxy.proxy.nfqueue.handler import LoopHandler, QueueHandler

__all__ = ["FallbackCounts", "NfqueueCollector"]


@dataclass(frozen=True, slots=True)
class FallbackCounts:
    """Packets that took the nat fallback since this process started managing the rules.

    ``by_service`` holds the service ports whose rules exist now; ``total`` also
    keeps the counts of service ports removed since (so it never decreases).
    """

    by_service: Mapping[str, int]
    total: int


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
