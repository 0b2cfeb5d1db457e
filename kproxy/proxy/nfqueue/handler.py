"""The threads that serve the NFQUEUE queues with a :class:`~kproxy.proxy.nfqueue.decider.Decider`.

:class:`QueueHandler` binds the queues (through :mod:`kproxy.kernel.nfqueue`),
serves all of them from ONE thread (the callback needs the GIL anyway, and one
thread keeps the selection state single-writer), gives every packet a verdict
(accept, marked or not) even when something fails, and keeps the counters that
:class:`~kproxy.proxy.nfqueue.collector.NfqueueCollector` exports.
:class:`LoopHandler` has the same surface over the fast path's ``NfqLoop`` (the
C loop when compiled).  Between two batches both do the same housekeeping
(:class:`_Housekeeping`): the verdict rate over one-second windows and the
affinity sweep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from kproxy.kernel.nfqueue import NfQueueError, PacketQueue, QueueStats, read_queue_stats
from kproxy.proxy.nfqueue.decider import REASONS, Decider
from kproxy.proxy.nfqueue.rules import MARK_MASK

__all__ = ["LoopHandler", "QueueFactory", "QueueHandler"]

log = logging.getLogger(__name__)

_KEEP: Final = 0xFFFFFFFF & ~MARK_MASK
SWEEP_INTERVAL_S: Final = 10.0
STOP_TIMEOUT_S: Final = 2.0

QueueFactory = Callable[[int, Callable[[Any], None]], PacketQueue]


class _Housekeeping:
    """What both serving loops do between two batches of verdicts, on their thread:
    the verdict rate over one-second windows and the affinity sweep every
    :data:`SWEEP_INTERVAL_S` (on the packet thread: the records stay single-writer)."""

    __slots__ = ("_count", "_decider", "_last_t", "_next_sweep", "pps")

    def __init__(self, decider: Decider) -> None:
        now = time.monotonic()
        self._decider = decider
        self._last_t = now
        self._count = 0
        self._next_sweep = now + SWEEP_INTERVAL_S
        self.pps = 0.0

    def tick(self, packets: int) -> None:
        """``packets`` more verdicts since the last tick."""
        self._count += packets
        now = time.monotonic()
        if now - self._last_t >= 1.0:
            self.pps = self._count / (now - self._last_t)
            self._last_t, self._count = now, 0
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            try:
                self._decider.sweep()
            except Exception:
                log.exception("affinity sweep failed")


class _Serving:
    """What both handlers share: the decider, the queues, the serving thread's
    handles and its :class:`_Housekeeping`, and the kernel's counters of the queues."""

    def __init__(
        self,
        decider: Decider,
        queues: Sequence[int],
        stats: Callable[[], Mapping[int, QueueStats]],
    ) -> None:
        self.decider = decider
        self.queue_nums = tuple(queues)
        self._stats = stats
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._house: _Housekeeping | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pps(self) -> float:
        """Verdicts per second over the last full second (0 when stopped)."""
        return self._house.pps if self._house is not None else 0.0

    def queue_stats(self) -> dict[int, QueueStats]:
        """Kernel counters of our queues (all of them, bound or not)."""
        stats = self._stats()
        return {n: stats[n] for n in self.queue_nums if n in stats}


class QueueHandler(_Serving):
    """Serves the bound queues from one daemon thread with a :class:`Decider`."""

    def __init__(
        self,
        decider: Decider,
        queues: Sequence[int],
        factory: QueueFactory,
        *,
        stats: Callable[[], Mapping[int, QueueStats]] = read_queue_stats,
    ) -> None:
        super().__init__(decider, queues, stats)
        self._factory = factory
        self._queues: list[PacketQueue] = []
        self._wake: tuple[int, int] | None = None
        self.packets = 0
        self.errors = 0

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
        house = self._house = _Housekeeping(self.decider)
        while not self._stop.is_set():
            seen = self.packets
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
            house.tick(self.packets - seen)

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
        self._house = None

    def _close_queues(self) -> None:
        queues, self._queues = self._queues, []
        for q in queues:
            try:
                q.close()
            except Exception:
                log.exception("cannot unbind NFQUEUE %d", q.queue_num)


class LoopHandler(_Serving):
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
        super().__init__(decider, queues, stats)
        self.loop: Any = decider.impl.NfqLoop(
            self.queue_nums,
            copy_range=copy_range,
            max_len=max_len,
            mark_mask=MARK_MASK,
            delegate=decider.decide,
        )
        self._lock = threading.Lock()
        self._seen_unmarked = [0] * (len(REASONS) + 1)
        self._seen_errors = 0

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
        house = self._house = _Housekeeping(self.decider)
        while not self._stop.is_set():
            served = 0
            try:
                served = self.loop.run(1.0)
            except OSError as e:
                log.error("NFQUEUE %s: %s", self.queue_nums, e)
                time.sleep(0.1)  # bounded retry rate on a broken socket
            house.tick(served)

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
                    self._house = None
                    return
                thread.join(STOP_TIMEOUT_S)
        self.loop.close()
        self._house = None
