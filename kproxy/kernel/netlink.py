"""Netlink framing and chunked, acked requests shared by the bulk kernel verbs.

Owns :class:`AckedSender`, the one mechanism behind the IPVS batch
(``NETLINK_GENERIC``), ipset batches (``NETLINK_NETFILTER``) and address
batches (``NETLINK_ROUTE``): many requests per ``send``, chunks bounded so
that their acks fit the receive buffer, every ack collected by sequence
number, and a count of messages and round trips (the IPVS acceptance counts
them).  It also reads dumps for callers that need them.  Errors are
:class:`OSError` (``TimeoutError`` when the kernel does not answer); callers
wrap them in their own error types.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_MESSAGES",
    "HDR",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "AckedSender",
    "BatchOutcome",
    "messages",
]

# Sized so that a chunk's acks (a few hundred bytes of skb each) fit the default
# receive buffer (rmem_max 208 KiB, doubled by the kernel) with room to spare.
CHUNK_MESSAGES: Final = 128
CHUNK_BYTES: Final = 32 * 1024
TIMEOUT_S: Final = 10.0
RECV_BYTES: Final = 1 << 20

HDR: Final = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10  # acks carry only the header of the request


class BatchOutcome:
    """``ok`` and ``raise_for_failures`` of a batch verb's result (a dataclass with a
    ``failures`` tuple of per-request errors); every request of a batch is tried."""

    __slots__ = ()
    failures: tuple[Exception, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        if self.failures:
            raise self.failures[0]


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, end) of each netlink message in ``data``."""
    offset = 0
    while offset + HDR.size <= len(data):
        size, kind, flags, seq, _ = HDR.unpack_from(data, offset)
        if size < HDR.size:
            return
        yield kind, flags, seq, offset + HDR.size, offset + size
        offset += (size + 3) & ~3


def error_code(data: bytes | memoryview, start: int) -> int:
    """The errno of an ``NLMSG_ERROR`` payload at ``start`` (0 is an ack)."""
    return -int(struct.unpack_from("=i", data, start)[0])


class AckedSender:
    """One blocking netlink socket of ``protocol`` for chunked, acked requests."""

    def __init__(
        self,
        protocol: int,
        chunk_messages: int = CHUNK_MESSAGES,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if chunk_messages < 1 or chunk_bytes < 1:
            raise ValueError("chunks need room for at least one message")
        self.chunk_messages = chunk_messages
        self.chunk_bytes = chunk_bytes
        self.messages_sent = 0
        self.round_trips = 0
        self._seq = 0
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
            sock.settimeout(TIMEOUT_S)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._buf = bytearray(RECV_BYTES)

    def next_seq(self) -> int:
        self._seq = (self._seq % 0x7FFFFFFF) + 1
        return self._seq

    def close(self) -> None:
        self._sock.close()

    def send_one(self, message: bytes) -> None:
        """Send one request (e.g. a dump) whose replies the caller reads with :meth:`recv`."""
        self._sock.send(message)
        self.messages_sent += 1
        self.round_trips += 1

    def recv(self) -> bytes:
        n = self._sock.recv_into(self._buf)
        return bytes(self._buf[:n])

    def send(self, requests: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Send ``(seq, message)`` pairs (each with ``NLM_F_ACK``); the errno of each
        refused one by seq (a missing seq was acked with 0)."""
        failed: dict[int, int] = {}
        chunk: list[int] = []
        data: list[bytes] = []
        size = 0
        for seq, msg in requests:
            if chunk and (len(chunk) >= self.chunk_messages or size + len(msg) > self.chunk_bytes):
                self._flush(chunk, data, failed)
                chunk, data, size = [], [], 0
            chunk.append(seq)
            data.append(msg)
            size += len(msg)
        if chunk:
            self._flush(chunk, data, failed)
        return failed

    def _flush(self, chunk: list[int], data: list[bytes], failed: dict[int, int]) -> None:
        self._sock.send(b"".join(data))
        self.messages_sent += len(chunk)
        self.round_trips += 1
        pending = set(chunk)
        while pending:
            n = self._sock.recv_into(self._buf)
            reply = memoryview(self._buf)[:n]
            for kind, _flags, seq, start, _end in messages(reply):
                if kind != NLMSG_ERROR or seq not in pending:
                    continue
                pending.discard(seq)
                code = error_code(reply, start)
                if code:
                    failed[seq] = code
