"""Conntrack verbs over ctnetlink (pyroute2's ``NFCTSocket``): list flows, delete flows.

This module owns every conntrack netlink call kproxy makes, the :class:`Flow` value
type those calls speak, and :class:`ConntrackError`, which keeps the failing input.

Invariants:

- Callers speak verbs (list the UDP flows of this family, delete these flows), never
  netlink attributes; :class:`ConntrackVerbs` is the contract, :class:`Conntrack`
  (real) and :class:`kproxy.kernel.fakes.conntrack.FakeConntrack` implement it, and
  ``tests/kernel/test_conntrack_contract.py`` holds both to the kernel's behaviour.
- One handle serves one L3 family (as upstream's ``ListEntries(ipFamily)``); a flow
  of the other family handed to :meth:`Conntrack.delete` is an error, not a no-op.
- :meth:`Conntrack.delete` deletes exactly the listed flows: the full original tuple
  plus, when the flow came from a listing, the kernel's conntrack id. A flow that
  expired and was re-created with the same tuple (say, DNAT'ed to a new endpoint)
  since the listing therefore survives. A flow that is already gone is not an error
  (it is what the caller wanted) and is not counted.
- Each verb opens its own netlink socket and closes it before returning: pyroute2's
  sync API binds a socket to the thread and event loop that first used it, and the
  proxy calls these verbs from whichever worker thread runs its sync. The verbs must
  not be called from inside a running asyncio loop.
- With ``netns`` set (tests), the socket is created inside that named namespace by a
  short-lived child process that ``setns``'s and passes the socket back (pyroute2's
  ``netns=``); a netlink socket stays bound to the namespace it was created in, so
  the calling process never changes namespace. The namespace is never created here
  (``flags=0``): a missing one is a :class:`ConntrackError`. The proxy passes
  ``None`` and runs inside the node's namespace.
"""

from __future__ import annotations

import errno as errno_mod
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Literal, Protocol

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

from kproxy.errors import KProxyError

__all__ = [
    "IPPROTO_SCTP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "PORT_PROTOCOLS",
    "Conntrack",
    "ConntrackError",
    "ConntrackVerbs",
    "Family",
    "Flow",
]

Family = Literal["ipv4", "ipv6"]
IPAddress = IPv4Address | IPv6Address

IPPROTO_TCP: Final = socket.IPPROTO_TCP
IPPROTO_UDP: Final = socket.IPPROTO_UDP
IPPROTO_SCTP: Final = 132
# Protocols whose tuple is (addresses, ports); only these flows can be deleted here,
# because the kernel needs the whole tuple (ICMP would need id/type/code).
PORT_PROTOCOLS: Final = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP})
PROTOCOL_NAMES: Final = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_SCTP: "sctp"}

_AF: Final[dict[Family, int]] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_IP_ATTR: Final[dict[Family, str]] = {"ipv4": "CTA_IP_V4", "ipv6": "CTA_IP_V6"}


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry: its original and reply tuples.

    With DNAT (a Service), ``orig_dst`` is the service address and ``reply_src`` the
    endpoint the kernel rewrote it to. Ports are 0 for protocols without ports.
    ``id`` is the kernel's conntrack id when the flow came from a listing; it is not
    part of equality, so a flow built by hand equals the listed one.
    """

    family: Family
    protocol: int
    orig_src: IPAddress
    orig_dst: IPAddress
    orig_sport: int
    orig_dport: int
    reply_src: IPAddress
    reply_dst: IPAddress
    reply_sport: int
    reply_dport: int
    id: int | None = field(default=None, compare=False)

    @classmethod
    def dnat(
        cls,
        protocol: int,
        client: tuple[str, int],
        service: tuple[str, int],
        endpoint: tuple[str, int],
    ) -> Flow:
        """The flow the kernel makes for ``client → service`` DNAT'ed to ``endpoint``."""
        c_ip, s_ip, e_ip = (ip_address(a) for a in (client[0], service[0], endpoint[0]))
        family: Family = "ipv4" if c_ip.version == 4 else "ipv6"
        return cls(
            family, protocol, c_ip, s_ip, client[1], service[1], e_ip, c_ip, endpoint[1], client[1]
        )

    def __str__(self) -> str:
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        return (
            f"{proto} src={self.orig_src} dst={self.orig_dst} sport={self.orig_sport} "
            f"dport={self.orig_dport} src={self.reply_src} dst={self.reply_dst} "
            f"sport={self.reply_sport} dport={self.reply_dport}"
        )


class ConntrackError(KProxyError):
    """A conntrack verb failed; keeps the verb, the namespace, the input and the errno."""

    def __init__(
        self,
        verb: str,
        *,
        errno: int,
        reason: str = "",
        netns: str | None = None,
        flow: Flow | None = None,
        flows: Iterable[Flow] = (),
        deleted: int = 0,
    ) -> None:
        self.verb = verb
        self.errno = errno
        self.reason = reason or (errno_mod.errorcode.get(errno, "") if errno else "")
        self.netns = netns
        self.flow = flow
        self.flows = tuple(flows)
        # For delete: how many of ``flows`` were deleted before the failure.
        self.deleted = deleted
        where = f" in netns {netns}" if netns else ""
        what = f" [{flow}]" if flow is not None else ""
        super().__init__(f"conntrack {verb}{where}{what}: {self.reason} (errno {errno})")


class ConntrackVerbs(Protocol):
    """What the conntrack reconciler needs; the real handle and the fake implement it."""

    @property
    def family(self) -> Family: ...
    def list_flows(self, protocol: int | None = None) -> list[Flow]: ...
    def delete(self, flows: Iterable[Flow]) -> int: ...


def _tuple_of(family: Family, nla: Any) -> tuple[IPAddress, IPAddress, int, int, int]:
    ip = nla.get_attr("CTA_TUPLE_IP")
    proto = nla.get_attr("CTA_TUPLE_PROTO")
    prefix = _IP_ATTR[family]
    src = ip_address(ip.get_attr(f"{prefix}_SRC"))
    dst = ip_address(ip.get_attr(f"{prefix}_DST"))
    # ctnetlink sends ports for every port-based protocol (SCTP too); pyroute2's own
    # tuple parser only reads them for TCP and UDP, so the attributes are read here.
    return (
        src,
        dst,
        int(proto.get_attr("CTA_PROTO_NUM")),
        int(proto.get_attr("CTA_PROTO_SRC_PORT") or 0),
        int(proto.get_attr("CTA_PROTO_DST_PORT") or 0),
    )


def flow_from_msg(family: Family, msg: Any) -> Flow:
    """A :class:`Flow` from one ctnetlink ``IPCTNL_MSG_CT_NEW`` dump message."""
    o_src, o_dst, proto, o_sport, o_dport = _tuple_of(family, msg.get_attr("CTA_TUPLE_ORIG"))
    r_src, r_dst, _, r_sport, r_dport = _tuple_of(family, msg.get_attr("CTA_TUPLE_REPLY"))
    ct_id = msg.get_attr("CTA_ID")
    return Flow(
        family, proto, o_src, o_dst, o_sport, o_dport, r_src, r_dst, r_sport, r_dport,
        id=None if ct_id is None else int(ct_id),
    )  # fmt: skip


def check_deletable(family: Family, flow: Flow) -> None:
    """Raise the :class:`ConntrackError` the kernel would for an undeletable flow."""
    if flow.family != family:
        raise ConntrackError(
            "delete", errno=errno_mod.EINVAL, reason=f"flow is not {family}", flow=flow
        )
    if flow.protocol not in PORT_PROTOCOLS:
        raise ConntrackError(
            "delete",
            errno=errno_mod.EINVAL,
            reason="only TCP, UDP and SCTP flows can be deleted",
            flow=flow,
        )


class Conntrack:
    """The real conntrack verbs for one family, optionally in a named netns."""

    def __init__(self, family: Family = "ipv4", netns: str | None = None) -> None:
        if family not in _AF:
            raise ValueError(f"unknown family {family!r}")
        self._family: Family = family
        self.netns = netns

    @property
    def family(self) -> Family:
        return self._family

    @contextmanager
    def _socket(self, verb: str) -> Iterator[Any]:
        try:
            sock = NFCTSocket(nfgen_family=_AF[self._family], netns=self.netns, flags=0)
        except OSError as e:  # FileNotFoundError: no such netns
            raise ConntrackError(verb, errno=e.errno or 0, reason=str(e), netns=self.netns) from e
        except (TimeoutError, RuntimeError) as e:  # the netns helper child failed
            raise ConntrackError(verb, errno=errno_mod.EIO, reason=str(e), netns=self.netns) from e
        try:
            yield sock
        finally:
            sock.close()

    def list_flows(self, protocol: int | None = None) -> list[Flow]:
        """Every flow of this family (of ``protocol`` only, when given)."""
        with self._socket("list") as sock:
            try:
                msgs = list(sock.dump())
            except NetlinkError as e:
                raise ConntrackError("list", errno=e.code, netns=self.netns) from e
            except OSError as e:
                raise ConntrackError(
                    "list", errno=e.errno or 0, reason=str(e), netns=self.netns
                ) from e
        af = _AF[self._family]
        # The kernel already dumps only the requested family; the check keeps a
        # surprise from turning into a parse error. Filtering the protocol here rather
        # than with a kernel-side CTA_FILTER keeps this working on kernels before 5.8.
        flows = (flow_from_msg(self._family, m) for m in msgs if m["nfgen_family"] == af)
        return [f for f in flows if protocol is None or f.protocol == protocol]

    def delete(self, flows: Iterable[Flow]) -> int:
        """Delete ``flows``; returns how many existed and were deleted.

        All flows are checked before any is deleted, so a bad input deletes nothing.
        """
        todo = list(flows)
        for flow in todo:
            check_deletable(self._family, flow)
        if not todo:
            return 0
        deleted = 0
        af = _AF[self._family]
        with self._socket("delete") as sock:
            for flow in todo:
                orig = NFCTAttrTuple(
                    family=af,
                    saddr=str(flow.orig_src),
                    daddr=str(flow.orig_dst),
                    proto=flow.protocol,
                    sport=flow.orig_sport,
                    dport=flow.orig_dport,
                )
                try:
                    sock.entry("del", tuple_orig=orig, id=flow.id)
                except NetlinkError as e:
                    # ENOENT: expired, deleted by someone else, or re-created since the
                    # listing (the id no longer matches); all mean "not ours to delete".
                    if e.code == errno_mod.ENOENT:
                        continue
                    raise ConntrackError(
                        "delete",
                        errno=e.code,
                        netns=self.netns,
                        flow=flow,
                        flows=todo,
                        deleted=deleted,
                    ) from e
                except OSError as e:
                    raise ConntrackError(
                        "delete",
                        errno=e.errno or 0,
                        reason=str(e),
                        netns=self.netns,
                        flow=flow,
                        flows=todo,
                        deleted=deleted,
                    ) from e
                deleted += 1
        return deleted
