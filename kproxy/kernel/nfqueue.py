"""NFQUEUE verbs: bind a queue, hand its packets to a callback, read the queue counters.

This module owns every use of :mod:`netfilterqueue` (python-netfilterqueue, which
links libnetfilter_queue) and the reading of ``/proc/net/netfilter/nfnetlink_queue``.

- :class:`NfQueue` binds one queue number in the caller's network namespace with
  a headers-only copy range and a bounded kernel queue length, sets the queue's
  ``NFQA_CFG_F_FAIL_OPEN`` flag (the binding does not expose queue flags, so the
  config message is sent on the binding's own netlink socket, which is the only
  peer the kernel accepts it from), and processes what is pending without
  blocking, so that its owner can multiplex several queues and a stop signal in
  one ``select``;
- :func:`read_queue_stats` parses the per-namespace queue table (the reader's
  network namespace is the one reported).

Invariants: a callback given to :class:`NfQueue` must give every packet a verdict
and must not raise (the binding would otherwise leave the packet queued until
unbind); :meth:`NfQueue.close` is idempotent and packets still queued at that
moment are dropped by the kernel (the ``--queue-bypass`` rules only help while
nobody is bound).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from kproxy.errors import KProxyError

__all__ = [
    "DEFAULT_COPY_RANGE",
    "DEFAULT_MAX_LEN",
    "PROC_QUEUES",
    "NfQueue",
    "NfQueueError",
    "PacketQueue",
    "QueueStats",
    "parse_queue_stats",
    "queue_config_message",
    "read_queue_stats",
]

PROC_QUEUES: Final = Path("/proc/net/netfilter/nfnetlink_queue")
# IPv4 (60) / IPv6 (40 + a few extension headers) + TCP (20) / UDP (8) base headers.
DEFAULT_COPY_RANGE: Final = 128
DEFAULT_MAX_LEN: Final = 4096

# linux/netfilter/nfnetlink.h and nfnetlink_queue.h
_NETLINK_NETFILTER: Final = 12
_NFNL_SUBSYS_QUEUE: Final = 3
_NFQNL_MSG_CONFIG: Final = 2
_NFQA_CFG_MASK: Final = 4
_NFQA_CFG_FLAGS: Final = 5
NFQA_CFG_F_FAIL_OPEN: Final = 0x1
_NLM_F_REQUEST: Final = 0x1


class NfQueueError(KProxyError):
    """A queue could not be bound or configured."""


class PacketQueue(Protocol):
    """What the handler needs of a bound queue (real or fake)."""

    @property
    def queue_num(self) -> int: ...

    def fileno(self) -> int: ...

    def process_pending(self) -> None: ...

    def close(self) -> None: ...


def queue_config_message(queue_num: int, flags: int, mask: int, seq: int = 0) -> bytes:
    """An ``NFQNL_MSG_CONFIG`` netlink message setting ``flags`` under ``mask``.

    No ``NLM_F_ACK``: a success sends nothing back, so nothing lands in the
    binding's receive stream; a failure's error message is ignored there.
    """
    attrs = struct.pack("=HH", 8, _NFQA_CFG_MASK) + struct.pack("!I", mask)
    attrs += struct.pack("=HH", 8, _NFQA_CFG_FLAGS) + struct.pack("!I", flags)
    # struct nfgenmsg: family (AF_UNSPEC), version (NFNETLINK_V0), res_id (queue, big-endian)
    body = struct.pack("=BBH", 0, 0, socket.htons(queue_num)) + attrs
    msg_type = (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST, seq, 0) + body


class NfQueue:
    """One bound NFQUEUE queue; ``callback(packet)`` runs for each queued packet."""

    def __init__(
        self,
        queue_num: int,
        callback: Callable[[Any], None],
        *,
        copy_range: int = DEFAULT_COPY_RANGE,
        max_len: int = DEFAULT_MAX_LEN,
        fail_open: bool = True,
    ) -> None:
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError as e:  # pragma: no cover - depends on the host
            raise NfQueueError(
                "the NetfilterQueue package is not installed (pip install NetfilterQueue)"
            ) from e
        self._queue_num = queue_num
        self.fail_open = False
        self._nfq: Any = None
        try:
            nfq = NetfilterQueue()
            nfq.bind(queue_num, callback, max_len=max_len, range=copy_range)
        except OSError as e:
            raise NfQueueError(f"cannot bind NFQUEUE {queue_num}: {e}") from e
        self._nfq = nfq
        self._fd = nfq.get_fd()
        if fail_open:
            self.fail_open = self._set_flags(NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN)

    @property
    def queue_num(self) -> int:
        return self._queue_num

    def _set_flags(self, flags: int, mask: int) -> bool:
        # A duplicate of the binding's fd is the same socket, hence the same netlink
        # port id, which the kernel requires of a queue's config messages.
        try:
            with socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER, os.dup(self._fd)
            ) as s:
                s.sendto(queue_config_message(self._queue_num, flags, mask), (0, 0))
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self._fd

    def process_pending(self) -> None:
        """Run the callback for every packet that can be read without blocking."""
        if self._nfq is not None:
            self._nfq.run(block=False)

    def close(self) -> None:
        nfq, self._nfq = self._nfq, None
        if nfq is not None:
            with contextlib.suppress(OSError):
                nfq.unbind()


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One row of ``/proc/net/netfilter/nfnetlink_queue``."""

    queue_num: int
    peer_portid: int
    waiting: int
    copy_mode: int
    copy_range: int
    queue_dropped: int
    user_dropped: int
    id_sequence: int


def parse_queue_stats(text: str) -> dict[int, QueueStats]:
    """Rows by queue number; malformed lines are skipped."""
    out: dict[int, QueueStats] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or not all(p.isdigit() for p in parts[:8]):
            continue
        n = [int(p) for p in parts[:8]]
        out[n[0]] = QueueStats(*n)
    return out


def read_queue_stats(path: Path = PROC_QUEUES) -> dict[int, QueueStats]:
    """The bound queues of the reader's network namespace (empty if none or unreadable)."""
    try:
        return parse_queue_stats(path.read_text())
    except OSError:
        return {}
