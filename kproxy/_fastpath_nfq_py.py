"""Pure-Python twin of the NFQUEUE loop of :mod:`kproxy._fastpath` (``_fastpath_nfq.pxi``).

Re-exported by :mod:`kproxy._fastpath_py`. Owns :class:`NfqLoop`: the queues of
one data path bound on one netlink socket and served by one thread that parses
each queued packet, chooses its endpoint and gives it a verdict. The compiled
build owns recv → parse → select → verdict in C with the GIL released
(``recvmmsg`` of up to :data:`NFQ_BATCH` packets, all their verdicts in one
``send``); this one is the python-netfilterqueue callback path, kept so that
``KPROXY_NO_EXTENSIONS=1`` still runs the nfqueue mode.

Contract, identical in both builds:

- ``NfqLoop(queues, *, copy_range=128, max_len=4096, mark_mask=0xFFFFFFFF,
  fail_open=True, gso=True, delegate=None)``; :meth:`NfqLoop.open` binds every
  queue in the caller's network namespace (``OSError`` when it cannot) with a
  headers-only copy range and a bounded kernel queue, and sets the queue flags
  ``NFQA_CFG_F_FAIL_OPEN`` / ``NFQA_CFG_F_GSO`` best effort (``fail_open`` /
  ``gso`` say whether the kernel took them); :meth:`NfqLoop.close` unbinds
  (idempotent);
- :meth:`NfqLoop.set_services` publishes entries ``(key, frontends, port,
  proto, maglev, rr, marks, delegate)`` in one swap (any thread): packets to a
  packed frontend address, port and IP protocol number get ``marks[i]`` where
  ``i`` is ``maglev``'s slot for the flow's 5-tuple hash (the same as
  ``Maglev.lookup_packet``) or else ``rr.next_index()``; with ``delegate``
  true the mark is whatever the loop's ``delegate(payload bytes)`` callable
  returns (ClientIP affinity stays in Python); the Maglev and RoundRobin
  objects must come from the same build and are used in place (the caller
  may carry them over between generations). It returns ``[(key, n)]``, the
  old generation's marked counts not yet taken;
- every packet is accepted; a non-zero mark ``m`` sets the packet mark to
  ``(mark & ~mark_mask) | m``, a zero leaves it as it is. Unmarked packets are
  counted by reason (``stats()["unmarked"]``: index 1..4 the parse status,
  5 no service, 6 error; delegated packets are counted by the delegate);
  nothing a packet holds makes the loop raise; a delegate that raises counts
  an error and leaves the packet unmarked;
- :meth:`NfqLoop.decide` is the loop's decision for one buffer (tests, no
  queue needed), counted like a queued packet but not in ``packets``;
- :meth:`NfqLoop.run` serves the queues for up to ``seconds`` or until
  :meth:`NfqLoop.wake` (any thread) and returns the packets handled; the
  caller runs it in a loop on its packet thread, where the delegate runs too.
  The compiled loop drains at most 1024 batches before it looks at the clock
  and the wake pipe; the twin's binding drains until the queue is empty, so
  under sustained load it can overrun (see :meth:`NfqLoop.close`).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from kproxy._fastpath_parse_py import parse_packet
from kproxy._fastpath_select_py import Maglev

__all__ = ["NFQ_BATCH", "NfqLoop"]

NFQ_BATCH: Final = 64
_NETLINK_NETFILTER: Final = 12
_NFQA_CFG_MASK: Final = 4
_NFQA_CFG_FLAGS: Final = 5
_NFQA_CFG_F_FAIL_OPEN: Final = 0x1
_NFQA_CFG_F_GSO: Final = 0x4
_NO_SERVICE: Final = 5
_ERROR: Final = 6

Entry = tuple[Any, Sequence[bytes], int, int, Any, Any, Sequence[int], bool]


def _config_message(queue_num: int, flags: int, mask: int) -> bytes:
    # NFQNL_MSG_CONFIG with NFQA_CFG_MASK/FLAGS; kproxy.kernel.nfqueue has the
    # same builder, but the fast path sits below the kernel layer.
    attrs = struct.pack("=HH", 8, _NFQA_CFG_MASK) + struct.pack("!I", mask)
    attrs += struct.pack("=HH", 8, _NFQA_CFG_FLAGS) + struct.pack("!I", flags)
    body = struct.pack("=BBH", 0, 0, socket.htons(queue_num)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 2, 1, 0, 0) + body


class _Svc:
    __slots__ = ("delegate", "maglev", "marked", "marks", "rr")

    def __init__(self, maglev: Any, rr: Any, marks: tuple[int, ...], delegate: bool) -> None:
        self.maglev = maglev
        self.rr = rr
        self.marks = marks
        self.delegate = delegate
        self.marked = 0


class NfqLoop:
    """NFQUEUE queues served by one thread (see the module docstring)."""

    def __init__(
        self,
        queues: Iterable[int],
        *,
        copy_range: int = 128,
        max_len: int = 4096,
        mark_mask: int = 0xFFFFFFFF,
        fail_open: bool = True,
        gso: bool = True,
        delegate: Callable[[bytes], int] | None = None,
    ) -> None:
        self._queues = tuple(int(q) for q in queues)
        for q in self._queues:
            if not 0 <= q <= 0xFFFF:
                raise ValueError(f"queue numbers are 16-bit, got {q}")
        if not 0 < copy_range <= 0xFFFF:
            raise ValueError(f"copy_range must be in 1..65535, got {copy_range}")
        self._copy_range = copy_range
        self._max_len = max_len
        self._keep = 0xFFFFFFFF & ~mark_mask
        self._flags = (_NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (_NFQA_CFG_F_GSO if gso else 0)
        self._want_fail_open, self._want_gso = fail_open, gso
        self.fail_open = False
        self.gso = False
        self._delegate = delegate
        self._table: dict[tuple[bytes, int, int], _Svc] = {}
        self._svcs: list[tuple[Any, _Svc]] = []
        self._lock = threading.Lock()
        self._nfqs: list[Any] = []
        self._wake: tuple[int, int] | None = None
        self._unmarked = [0] * 7
        self._packets = self._errors = self._delegated = 0

    @property
    def queues(self) -> tuple[int, ...]:
        return self._queues

    @property
    def bound(self) -> bool:
        return bool(self._nfqs)

    def fileno(self) -> int:
        return self._nfqs[0].get_fd() if self._nfqs else -1

    # -- binding -------------------------------------------------------------------
    def open(self) -> None:
        """Bind every queue in the caller's network namespace; raises OSError."""
        if self._nfqs:
            return
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError as e:  # pragma: no cover - depends on the host
            raise OSError(f"the NetfilterQueue package is not installed: {e}") from e
        try:
            for q in self._queues:
                nfq = NetfilterQueue()
                nfq.bind(q, self._callback, max_len=self._max_len, range=self._copy_range)
                self._nfqs.append(nfq)
                if self._flags and self._set_flags(nfq.get_fd(), q):
                    self.fail_open, self.gso = self._want_fail_open, self._want_gso
            if self._wake is None:
                self._wake = os.pipe()
                os.set_blocking(self._wake[0], False)
        except BaseException:
            self.close()
            raise

    def _set_flags(self, fd: int, queue_num: int) -> bool:
        # A dup of the binding's fd is the same socket (same netlink port id),
        # the only peer the kernel takes a queue's config from.
        try:
            with socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER, os.dup(fd)
            ) as s:
                s.sendto(_config_message(queue_num, self._flags, self._flags), (0, 0))
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Unbind the queues (idempotent).

        The compiled build refuses this while :meth:`run` runs (RuntimeError);
        here it is allowed, and is how a run() stuck draining a saturated queue
        (the binding drains until EAGAIN) is ended: no more packets arrive.
        """
        nfqs, self._nfqs = self._nfqs, []
        for nfq in nfqs:
            with contextlib.suppress(OSError):
                nfq.unbind()
        if self._wake is not None:
            for fd in self._wake:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake = None

    # -- tables (any thread) -------------------------------------------------------
    def set_services(self, services: Iterable[Entry]) -> list[tuple[Any, int]]:
        """Publish ``(key, frontends, port, proto, maglev, rr, marks, delegate)`` entries."""
        table: dict[tuple[bytes, int, int], _Svc] = {}
        svcs: list[tuple[Any, _Svc]] = []
        for key, frontends, port, proto, maglev, rr, marks, delegate in services:
            if maglev is None and rr is None and not delegate:
                raise ValueError("a service needs a Maglev, a RoundRobin or the delegate")
            if maglev is not None and not isinstance(maglev, Maglev):
                raise TypeError(f"expected the twin's Maglev, got {type(maglev).__name__}")
            if not (0 <= port <= 0xFFFF and 0 <= proto <= 0xFF):
                raise ValueError("port must fit 16 bits and proto 8 bits")
            if maglev is None and rr is not None and len(rr) != len(marks):
                raise ValueError("the round robin and the marks differ in length")
            svc = _Svc(maglev, rr, tuple(marks), bool(delegate))
            svcs.append((key, svc))
            for ip in frontends:
                if len(ip) not in (4, 16):
                    raise ValueError(f"frontends are packed addresses, got {ip!r}")
                table[(bytes(ip), port, proto)] = svc
        with self._lock:
            old = self._svcs
            # The packet thread reads self._table once per packet: old or new, never a mix.
            self._table, self._svcs = table, svcs
        return [(k, s.marked) for k, s in old if s.marked]

    def take_marked(self) -> list[tuple[Any, int]]:
        """``[(key, n)]``: packets marked per service since the last call (then reset)."""
        out: list[tuple[Any, int]] = []
        with self._lock:
            for key, svc in self._svcs:
                n = svc.marked
                if n:
                    svc.marked -= n  # a packet counted meanwhile stays for next time
                    out.append((key, n))
        return out

    def stats(self) -> dict[str, Any]:
        """``{"packets", "errors", "delegated", "send_errors", "unmarked": [7 ints]}``."""
        return {
            "packets": self._packets,
            "errors": self._errors,
            "delegated": self._delegated,
            "send_errors": 0,
            "unmarked": list(self._unmarked),
        }

    # -- the decision ----------------------------------------------------------------
    def decide(self, buf: bytes | bytearray | memoryview) -> int:
        """The mark field value the loop gives ``buf`` (IP header first); 0: unmarked."""
        status, _, proto, _, _, dst, dport = parse_packet(buf)
        if status:
            self._unmarked[status] += 1
            return 0
        svc = self._table.get((dst, dport, proto))
        if svc is None:
            self._unmarked[_NO_SERVICE] += 1
            return 0
        if svc.delegate:
            self._delegated += 1
            try:
                assert self._delegate is not None, "no delegate"
                m = int(self._delegate(bytes(buf)))
                if not 0 <= m <= 0xFFFFFFFF:
                    raise OverflowError(m)
            except BaseException:
                self._errors += 1
                return 0
            return m
        i: int
        try:
            i = svc.maglev.lookup_packet(buf) if svc.maglev is not None else svc.rr.next_index()
        except LookupError:  # no backend with weight / no endpoint
            i = -1
        if not 0 <= i < len(svc.marks):
            self._unmarked[_ERROR] += 1
            return 0
        svc.marked += 1
        return svc.marks[i]

    def _callback(self, pkt: Any) -> None:
        self._packets += 1
        try:
            m = self.decide(pkt.get_payload())
            if m:
                pkt.set_mark((pkt.mark & self._keep) | m)
        except Exception:
            self._errors += 1
            self._unmarked[_ERROR] += 1
        # A verdict for every packet, whatever failed.
        with contextlib.suppress(Exception):
            pkt.accept()

    # -- the loop --------------------------------------------------------------------
    def wake(self) -> None:
        """Make a running :meth:`run` return soon (any thread)."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")

    def run(self, seconds: float) -> int:
        """Serve the queues for up to ``seconds`` or until :meth:`wake`; returns packets handled."""
        if not self._nfqs or self._wake is None:
            raise RuntimeError("NfqLoop.run() before open()")
        before = self._packets
        fds = {nfq.get_fd(): nfq for nfq in self._nfqs}
        wake = self._wake[0]
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([*fds, wake], [], [], left)
            if wake in ready:
                with contextlib.suppress(OSError):
                    while os.read(wake, 64):
                        pass
                break
            for fd in ready:
                fds[fd].run(block=False)
        return self._packets - before
