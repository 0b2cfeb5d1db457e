"""IPVS in bulk: one dump of the whole table, and many changes per round trip.

This module owns the fast path of IPVS programming next to
:mod:`kproxy.kernel.ipvs` (whose one-request-per-verb :class:`~kproxy.kernel.ipvs.Ipvs`
it does not change): :class:`IpvsBatch` reads every service and its destinations,
and applies a list of :class:`IpvsOp` by packing many generic-netlink requests
into one ``sendmsg`` and then collecting their acks.  :class:`IpvsOneByOne` applies
the same operations through any :class:`~kproxy.kernel.ipvs.IpvsVerbs` one request
at a time: over :class:`~kproxy.kernel.fakes.ipvs.FakeIpvs` it is the fake of
:class:`IpvsBatch`, over :class:`~kproxy.kernel.ipvs.Ipvs` the baseline it is
measured against.  The bytes on the wire are :mod:`kproxy.kernel.ipvs_wire`'s.

Protocol facts this relies on (reference §3.1, checked in the VM):

- IPVS has no transaction command, but the kernel processes every netlink message
  of one ``sendmsg`` in order and acks each one (``NLM_F_ACK``): a chunk of requests
  costs one round trip, and a failed request does not stop the ones after it.
- Acks queue on our socket's receive buffer; one that does not fit is dropped
  (``ENOBUFS``).  Chunks are bounded (:data:`CHUNK_MESSAGES`, :data:`CHUNK_BYTES`)
  so their acks always fit; ``NETLINK_CAP_ACK`` keeps each ack to a header.
- Destinations can only be dumped per service, and a socket runs one dump at a
  time (a second one is refused with ``EBUSY``), so a full read is one service
  dump plus one destination dump per service: dumps cannot be pipelined.

Invariants:

- ``messages_sent`` and ``round_trips`` count every request and every
  ``sendmsg``-then-wait cycle over the handle's life, dumps included; an
  :class:`ApplyResult` carries the counts of one :meth:`~IpvsBatch.apply`.
- One netlink socket per :class:`IpvsBatch`, opened in the constructor (the family
  id is resolved once, with pyroute2) and kept until :meth:`IpvsBatch.close`.  The
  socket is plain and blocking, so the handle may be used from any one thread at a
  time, and never touches an asyncio loop.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle
from kproxy.kernel.ipvs import IpvsError, IpvsVerbs, RealServer, VirtualServer
from kproxy.kernel.ipvs_wire import (
    _ATTR_DEST,
    _ATTR_SERVICE,
    _CMD_GET_DEST,
    _CMD_GET_SERVICE,
    _GENL,
    _NETLINK_GENERIC,
    _NLM_F_DUMP,
    _NLM_F_REQUEST,
    Encoder,
    IpvsOp,
    OpKind,
    _af,
    _attrs,
    _dest_from,
    _message,
    _service_attrs,
    _service_from,
    encode_op,
)
from kproxy.kernel.netlink import (
    CHUNK_BYTES,
    CHUNK_MESSAGES,
    NLMSG_DONE,
    NLMSG_ERROR,
    AckedSender,
    error_code,
    messages,
)

__all__ = [
    "ApplyResult",
    "Encoder",
    "IpvsBatch",
    "IpvsBatchError",
    "IpvsBulkVerbs",
    "IpvsOneByOne",
    "IpvsOp",
    "OpFailure",
    "OpKind",
    "encode_op",
]


@dataclass(frozen=True, slots=True)
class OpFailure:
    """An operation the kernel refused, with its errno."""

    op: IpvsOp
    errno: int

    def __str__(self) -> str:
        return f"{self.op}: {errno_mod.errorcode.get(self.errno, '?')} (errno {self.errno})"


class IpvsBatchError(KProxyError):
    """Some operations of an :meth:`~IpvsBatch.apply` failed; all the others were applied."""

    def __init__(self, failures: Sequence[OpFailure]) -> None:
        self.failures = tuple(failures)
        shown = "; ".join(str(f) for f in self.failures[:5])
        more = f" (+{len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"ipvs batch: {len(self.failures)} operation(s) failed: {shown}{more}")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one apply sent and what failed (every other operation took effect)."""

    messages: int
    round_trips: int
    failures: tuple[OpFailure, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        if self.failures:
            raise IpvsBatchError(self.failures)


class IpvsBulkVerbs(Protocol):
    """Whole-table read and bulk apply; :class:`IpvsBatch` and :class:`IpvsOneByOne`."""

    @property
    def messages_sent(self) -> int: ...
    @property
    def round_trips(self) -> int: ...
    def dump(self) -> dict[VirtualServer, list[RealServer]]: ...
    def apply(self, ops: Iterable[IpvsOp]) -> ApplyResult: ...
    def close(self) -> None: ...


# --- the real handle -----------------------------------------------------------------------


def _resolve_family() -> int:
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket
    from pyroute2.netlink.generic.ipvs import GENL_NAME, ipvsmsg

    try:
        genl = GenericNetlinkSocket()
    except OSError as e:
        raise IpvsError("open", None, None, e.errno or 0, str(e)) from e
    try:
        genl.bind(GENL_NAME, ipvsmsg)
        return int(genl.prid)
    except NetlinkError as e:
        # ENOENT here means the kernel has no IPVS family (ip_vs not loaded).
        raise IpvsError("open", None, None, e.code, "no IPVS netlink family?") from e
    finally:
        genl.close()


class IpvsBatch(SocketHandle):
    """One IPVS netlink socket for the proxy's life: whole-table dumps and chunked applies."""

    _sock: AckedSender

    def __init__(
        self, chunk_messages: int = CHUNK_MESSAGES, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        if chunk_messages < 1 or chunk_bytes < 1:
            raise ValueError("chunks need room for at least one message")
        self._closed = False
        self._family = _resolve_family()
        try:
            self._sock = AckedSender(_NETLINK_GENERIC, chunk_messages, chunk_bytes)
        except OSError as e:
            raise IpvsError("open", None, None, e.errno or 0, str(e)) from e

    @property
    def chunk_messages(self) -> int:
        return self._sock.chunk_messages

    @property
    def messages_sent(self) -> int:
        return self._sock.messages_sent

    @property
    def round_trips(self) -> int:
        return self._sock.round_trips

    def _check_open(self, verb: str) -> None:
        if self._closed:
            raise IpvsError(verb, None, None, errno_mod.EBADF, "handle is closed")

    @staticmethod
    def _wrap(verb: str, e: OSError) -> IpvsError:
        if isinstance(e, TimeoutError):
            return IpvsError(verb, None, None, errno_mod.ETIMEDOUT, "no answer from the kernel")
        # ENOBUFS: the kernel dropped replies
        return IpvsError(verb, None, None, e.errno or 0, str(e))

    # reads

    def _dump(self, verb: str, cmd: int, body: bytes) -> Iterator[memoryview]:
        """The top-level attribute payloads of every reply to one dump request."""
        seq = self._sock.next_seq()
        flags = _NLM_F_REQUEST | _NLM_F_DUMP  # a dump ends in NLMSG_DONE, not an ack
        try:
            self._sock.send_one(_message(self._family, cmd, flags, seq, body))
            while True:
                data = self._sock.recv()
                for kind, _flags, mseq, start, end in messages(data):
                    if mseq != seq:
                        continue  # a stale ack of an earlier, abandoned request
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        code = error_code(data, start)
                        if code:
                            raise IpvsError(verb, None, None, code)
                        return
                    yield memoryview(data)[start + _GENL.size : end]
        except OSError as e:
            raise self._wrap(verb, e) from e

    def list_services(self) -> list[VirtualServer]:
        """Every (non-fwmark) virtual service: one dump."""
        self._check_open("list-services")
        out: list[VirtualServer] = []
        for payload in self._dump("list-services", _CMD_GET_SERVICE, b""):
            nested = _attrs(payload, 0, len(payload)).get(_ATTR_SERVICE)
            vs = _service_from(nested) if nested is not None else None
            if vs is not None:
                out.append(vs)
        return out

    def list_destinations(self, vs: VirtualServer) -> list[RealServer]:
        """The destinations of ``vs``: one dump (empty when ``vs`` does not exist)."""
        self._check_open("list-destinations")
        out: list[RealServer] = []
        body = _service_attrs(vs, full=False)
        for payload in self._dump("list-destinations", _CMD_GET_DEST, body):
            nested = _attrs(payload, 0, len(payload)).get(_ATTR_DEST)
            if nested is not None:
                out.append(_dest_from(nested, _af(vs.address)))
        return out

    def dump(self) -> dict[VirtualServer, list[RealServer]]:
        """Every service and its destinations: 1 + (number of services) dumps."""
        return {vs: self.list_destinations(vs) for vs in self.list_services()}

    # writes

    def apply(self, ops: Iterable[IpvsOp]) -> ApplyResult:
        """Send ``ops`` in order, many per round trip; every op is tried.

        Failures are returned, not raised (an op that fails does not undo or stop the
        others, exactly as when they are sent one by one); call
        :meth:`ApplyResult.raise_for_failures` to turn them into an exception.
        """
        self._check_open("apply")
        sent0, trips0 = self.messages_sent, self.round_trips
        by_seq: dict[int, IpvsOp] = {}
        requests: list[tuple[int, bytes]] = []
        encode = Encoder(self._family).encode
        for op in ops:
            seq = self._sock.next_seq()
            by_seq[seq] = op
            requests.append((seq, encode(op, seq)))
        try:
            failed = self._sock.send(requests)
        except OSError as e:
            raise self._wrap("apply", e) from e
        failures = tuple(
            OpFailure(by_seq[seq], failed[seq]) for seq, _ in requests if seq in failed
        )
        return ApplyResult(self.messages_sent - sent0, self.round_trips - trips0, failures)


# --- one request at a time, over any IpvsVerbs -------------------------------------------


class IpvsOneByOne:
    """:class:`IpvsBulkVerbs` over :class:`~kproxy.kernel.ipvs.IpvsVerbs`: one request per op.

    Over the fake it is the fake of :class:`IpvsBatch` (same results, same failures,
    and the message count a one-at-a-time client pays); over the real
    :class:`~kproxy.kernel.ipvs.Ipvs` it is the baseline the batch is measured against.
    """

    def __init__(self, verbs: IpvsVerbs) -> None:
        self.verbs = verbs
        self._messages_sent = 0

    @property
    def messages_sent(self) -> int:
        return self._messages_sent

    @property
    def round_trips(self) -> int:
        return self._messages_sent  # every request waits for its own answer

    def close(self) -> None:
        self.verbs.close()

    def dump(self) -> dict[VirtualServer, list[RealServer]]:
        services = self.verbs.list_services()
        self._messages_sent += 1 + len(services)
        return {vs: self.verbs.list_destinations(vs) for vs in services}

    def apply(self, ops: Iterable[IpvsOp]) -> ApplyResult:
        v = self.verbs
        failures: list[OpFailure] = []
        sent0 = self._messages_sent
        for op in ops:
            self._messages_sent += 1
            rs = op.destination
            try:
                if op.kind is OpKind.ADD_SERVICE:
                    v.add_service(op.service)
                elif op.kind is OpKind.EDIT_SERVICE:
                    v.set_service(op.service)
                elif op.kind is OpKind.DELETE_SERVICE:
                    v.delete_service(op.service)
                elif rs is None:  # unreachable: IpvsOp checks this
                    raise ValueError(f"{op.kind.name} without a destination")
                elif op.kind is OpKind.ADD_DESTINATION:
                    v.add_destination(op.service, rs)
                elif op.kind is OpKind.EDIT_DESTINATION:
                    v.set_destination(op.service, rs)
                else:
                    v.delete_destination(op.service, rs)
            except IpvsError as e:
                if e.errno == errno_mod.EBADF:
                    raise  # a closed handle is the caller's bug, not an op failure
                failures.append(OpFailure(op, e.errno))
        n = self._messages_sent - sent0
        return ApplyResult(n, n, tuple(failures))
