"""IPVS virtual services and their destinations, over pyroute2's generic-netlink socket.

This module owns the translation between kproxy's IPVS value types
(:class:`VirtualServer`, :class:`RealServer`) and the kernel's ``IPVS`` generic
netlink family, and the :class:`Ipvs` handle that issues the verbs (add, list,
set, delete a virtual service or a destination).

Invariants, each one a trap in pyroute2 or the kernel:

* Every request carries the scheduler, flags (with a full mask), persistence
  timeout and netmask of a service, and the forwarding method and weight of a
  destination.  pyroute2 defaults to ``wlc`` and direct routing; kproxy never
  relies on those defaults (kproxy's scheduler default is ``rr``, forwarding is
  masquerading/NAT).
* Changes go through netlink ``SET_*`` (pyroute2 ``"set"``), never pyroute2's
  ``"update"``, which sends a delete.
* Replies are read from their raw attributes; pyroute2's ``from_message`` keeps
  its own defaults for some fields.
* The netmask of an IPv4 service is the be32 mask (``0xffffffff`` for a single
  address); that of an IPv6 service is a prefix length (128), which the kernel
  reads as a host-order u32 from the same 4-byte attribute.
* The kernel's own flag ``HASHED`` is stripped on read; it is not settable.
* One netlink socket per :class:`Ipvs`, opened in the constructor and held
  until :meth:`Ipvs.close`.  The sync pyroute2 API must not be called from a
  running asyncio loop (run it in a thread).

Every failure is an :class:`IpvsError` carrying the verb, the input and the
kernel's errno.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

from pyroute2 import IPVS, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle

__all__ = [
    "ForwardingMethod",
    "IPProtocol",
    "Ipvs",
    "IpvsError",
    "IpvsVerbs",
    "RealServer",
    "ServiceFlags",
    "VirtualServer",
]

IPAddress = IPv4Address | IPv6Address

_FULL_MASK = 0xFFFFFFFF
_IPV4_HOST_NETMASK = 0xFFFFFFFF
_IPV6_HOST_NETMASK = 128


class IPProtocol(enum.IntEnum):
    """IP protocol numbers a virtual service can match."""

    TCP = 6
    UDP = 17
    SCTP = 132


class ForwardingMethod(enum.IntEnum):
    """``IP_VS_CONN_F_*`` forwarding methods of a destination; kproxy uses MASQ (NAT)."""

    MASQ = 0
    LOCALNODE = 1
    TUNNEL = 2
    DROUTE = 3
    BYPASS = 4


class ServiceFlags(enum.IntFlag):
    """``IP_VS_SVC_F_*`` service flags (uapi ``ip_vs.h``)."""

    NONE = 0
    PERSISTENT = 0x1
    HASHED = 0x2  # set by the kernel itself; stripped on read, never sent
    ONEPACKET = 0x4
    SCHED1 = 0x8  # mh-fallback / sh-fallback
    SCHED2 = 0x10  # mh-port / sh-port
    SCHED3 = 0x20


def _host_netmask(address: IPAddress) -> int:
    return _IPV6_HOST_NETMASK if address.version == 6 else _IPV4_HOST_NETMASK


def _check_endpoint(address: object, port: int) -> None:
    if not isinstance(address, (IPv4Address, IPv6Address)):  # a tuple: faster than a union
        raise TypeError(f"address must be an ipaddress object, not {address!r}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A virtual service: the (address, port, protocol) key plus its scheduling settings.

    ``netmask`` 0 means "a single address" and is normalised to the family's
    value (``0xffffffff`` for IPv4, prefix length 128 for IPv6), so a service read
    back from the kernel compares equal to the one that was added.
    """

    address: IPAddress
    port: int
    protocol: IPProtocol
    scheduler: str = "rr"
    flags: ServiceFlags = ServiceFlags.NONE
    timeout: int = 0  # persistence timeout in seconds (only meaningful with PERSISTENT)
    netmask: int = 0

    def __post_init__(self) -> None:
        _check_endpoint(self.address, self.port)
        if not self.scheduler:
            raise ValueError("a virtual server needs an explicit scheduler")
        # The conversions only when needed: a full plan builds tens of thousands.
        if type(self.protocol) is not IPProtocol:
            object.__setattr__(self, "protocol", IPProtocol(self.protocol))
        if type(self.flags) is not ServiceFlags or self.flags & ServiceFlags.HASHED:
            object.__setattr__(self, "flags", ServiceFlags(self.flags) & ~ServiceFlags.HASHED)
        if self.netmask == 0:
            object.__setattr__(self, "netmask", _host_netmask(self.address))

    @property
    def key(self) -> tuple[IPAddress, int, IPProtocol]:
        """What identifies the service in the kernel."""
        return (self.address, self.port, self.protocol)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol.name}"


@dataclass(frozen=True, slots=True)
class RealServer:
    """A destination of a virtual service.

    The connection counters are only filled in when read from the kernel and do
    not take part in equality: two reads of the same destination compare equal.
    """

    address: IPAddress
    port: int
    weight: int = 1
    forwarding: ForwardingMethod = ForwardingMethod.MASQ
    active_connections: int = field(default=0, compare=False)
    inactive_connections: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        _check_endpoint(self.address, self.port)
        if self.weight < 0:
            raise ValueError(f"negative weight: {self.weight}")
        if type(self.forwarding) is not ForwardingMethod:
            object.__setattr__(self, "forwarding", ForwardingMethod(self.forwarding))

    @property
    def key(self) -> tuple[IPAddress, int]:
        """What identifies the destination within its service."""
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


class IpvsError(KProxyError):
    """An IPVS verb failed; keeps the verb, its input and the kernel's errno."""

    def __init__(
        self,
        verb: str,
        service: VirtualServer | None,
        destination: RealServer | None,
        errno: int,
        reason: str = "",
    ) -> None:
        self.verb = verb
        self.service = service
        self.destination = destination
        self.errno = errno
        self.reason = reason or (errno_mod.errorcode.get(errno, "") if errno else "")
        words = [f"ipvs {verb}", *(str(x) for x in (service, destination) if x is not None)]
        super().__init__(f"{' '.join(words)}: {self.reason} (errno {errno})")


class IpvsVerbs(Protocol):
    """The verbs the IPVS proxy mode depends on; :class:`Ipvs` and the fake implement them."""

    def add_service(self, vs: VirtualServer) -> None: ...
    def set_service(self, vs: VirtualServer) -> None: ...
    def delete_service(self, vs: VirtualServer) -> None: ...
    def list_services(self) -> list[VirtualServer]: ...
    def add_destination(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def set_destination(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def delete_destination(self, vs: VirtualServer, rs: RealServer) -> None: ...
    def list_destinations(self, vs: VirtualServer) -> list[RealServer]: ...
    def close(self) -> None: ...


# --- wire encoding -------------------------------------------------------------------


def _netmask_attr(address: IPAddress, netmask: int) -> str:
    # pyroute2 types the NETMASK attribute as ip4addr (4 bytes, written in order).
    # IPv4: a be32 mask, so the dotted form is the mask itself.  IPv6: the kernel
    # reads a prefix length as a host-order u32 from the same 4 bytes.
    if address.version == 4:
        return str(IPv4Address(netmask))
    raw = netmask.to_bytes(4, sys.byteorder)
    return str(IPv4Address(raw))


def _netmask_from_attr(family: int, value: str) -> int:
    packed = IPv4Address(value).packed
    if family == 10:  # AF_INET6
        return int.from_bytes(packed, sys.byteorder)
    return int.from_bytes(packed, "big")


def _service_nla(vs: VirtualServer) -> Any:
    return IPVSService(
        af=10 if vs.address.version == 6 else 2,
        addr=str(vs.address),
        port=vs.port,
        protocol=int(vs.protocol),
        sched_name=vs.scheduler,
        flags={"flags": int(vs.flags), "mask": _FULL_MASK},
        timeout=vs.timeout,
        netmask=_netmask_attr(vs.address, vs.netmask),
    )


def _dest_nla(rs: RealServer) -> Any:
    return IPVSDest(
        addr=str(rs.address),
        addr_family=10 if rs.address.version == 6 else 2,
        port=rs.port,
        fwd_method=int(rs.forwarding),
        weight=rs.weight,
        u_thresh=0,
        l_thresh=0,
    )


def _attrs(msg: Any, nla: str) -> dict[str, Any]:
    nested = msg.get_attr(nla)
    if nested is None:
        raise ValueError(f"reply without {nla}")
    return {name: value for name, value in nested["attrs"]}


def _service_from_msg(msg: Any) -> VirtualServer:
    a = _attrs(msg, "IPVS_CMD_ATTR_SERVICE")
    family = int(a["IPVS_SVC_ATTR_AF"])
    return VirtualServer(
        address=ip_address(a["IPVS_SVC_ATTR_ADDR"]),
        port=int(a["IPVS_SVC_ATTR_PORT"]),
        protocol=IPProtocol(int(a["IPVS_SVC_ATTR_PROTOCOL"])),
        scheduler=str(a["IPVS_SVC_ATTR_SCHED_NAME"]),
        flags=ServiceFlags(int(a["IPVS_SVC_ATTR_FLAGS"]["flags"])),
        timeout=int(a["IPVS_SVC_ATTR_TIMEOUT"]),
        netmask=_netmask_from_attr(family, a["IPVS_SVC_ATTR_NETMASK"]),
    )


def _dest_from_msg(msg: Any) -> RealServer:
    a = _attrs(msg, "IPVS_CMD_ATTR_DEST")
    return RealServer(
        address=ip_address(a["IPVS_DEST_ATTR_ADDR"]),
        port=int(a["IPVS_DEST_ATTR_PORT"]),
        weight=int(a["IPVS_DEST_ATTR_WEIGHT"]),
        forwarding=ForwardingMethod(int(a["IPVS_DEST_ATTR_FWD_METHOD"]) & 0x7),
        active_connections=int(a.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
        inactive_connections=int(a.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
    )


# --- the handle -----------------------------------------------------------------------


class Ipvs(SocketHandle):
    """One IPVS generic-netlink socket and the verbs over it.

    Not thread-safe; use one instance per thread.  Must not be used from inside a
    running asyncio event loop (pyroute2's sync API runs its own loop per call).
    """

    def __init__(self) -> None:
        self._closed = False
        try:
            self._sock: Any = IPVS()
        except NetlinkError as e:
            # ENOENT here means the kernel has no IPVS family (ip_vs not loaded).
            raise IpvsError("open", None, None, e.code, "no IPVS netlink family?") from e
        except OSError as e:
            raise IpvsError("open", None, None, e.errno or 0, str(e)) from e

    def _call(
        self,
        verb: str,
        vs: VirtualServer | None,
        rs: RealServer | None,
        fn: Any,
        *args: Any,
    ) -> list[Any]:
        if self._closed:
            raise IpvsError(verb, vs, rs, errno_mod.EBADF, "handle is closed")
        try:
            return list(fn(*args))
        except NetlinkError as e:
            raise IpvsError(verb, vs, rs, e.code) from e
        except OSError as e:
            raise IpvsError(verb, vs, rs, e.errno or 0, str(e)) from e

    # services

    def add_service(self, vs: VirtualServer) -> None:
        """Create ``vs``; EEXIST if a service with its key exists."""
        self._call("add-service", vs, None, self._sock.service, "add", _service_nla(vs))

    def set_service(self, vs: VirtualServer) -> None:
        """Change scheduler/flags/timeout/netmask of an existing service; ESRCH if absent."""
        self._call("set-service", vs, None, self._sock.service, "set", _service_nla(vs))

    def delete_service(self, vs: VirtualServer) -> None:
        """Delete the service with ``vs``'s key and all its destinations; ESRCH if absent."""
        self._call("delete-service", vs, None, self._sock.service, "del", _service_nla(vs))

    def list_services(self) -> list[VirtualServer]:
        """Every virtual service (fwmark services are skipped: kproxy makes none)."""
        msgs = self._call("list-services", None, None, self._sock.service, "dump")
        out: list[VirtualServer] = []
        for msg in msgs:
            if _attrs(msg, "IPVS_CMD_ATTR_SERVICE").get("IPVS_SVC_ATTR_FWMARK"):
                continue
            out.append(_service_from_msg(msg))
        return out

    # destinations

    def add_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        """Add ``rs`` to ``vs``; EEXIST if present, ESRCH if ``vs`` is absent."""
        sock = self._sock
        self._call("add-destination", vs, rs, sock.dest, "add", _service_nla(vs), _dest_nla(rs))

    def set_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        """Change weight/forwarding of ``rs`` in ``vs``; ENOENT if absent, ESRCH if no ``vs``."""
        sock = self._sock
        self._call("set-destination", vs, rs, sock.dest, "set", _service_nla(vs), _dest_nla(rs))

    def delete_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        """Remove ``rs`` from ``vs``; ENOENT if absent, ESRCH if ``vs`` is absent."""
        sock = self._sock
        self._call("delete-destination", vs, rs, sock.dest, "del", _service_nla(vs), _dest_nla(rs))

    def list_destinations(self, vs: VirtualServer) -> list[RealServer]:
        """The destinations of ``vs`` (empty when ``vs`` does not exist, as the kernel does)."""
        msgs = self._call("list-destinations", vs, None, self._sock.dest, "dump", _service_nla(vs))
        return [_dest_from_msg(m) for m in msgs]


def set_timeouts(
    tcp: int,
    tcp_fin: int,
    udp: int,
    *,
    run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] | None = None,
) -> None:
    """Set the IPVS connection timeouts in seconds (``ipvsadm --set``; 0 keeps a value).

    This is ``IPVS_CMD_SET_CONFIG``; pyroute2's IPVS class has no verb for it, and
    upstream itself calls ``ipvsadm --set`` semantics through libipvs, so the one
    exec per start is the simplest faithful path.
    """
    if min(tcp, tcp_fin, udp) < 0:
        raise IpvsError("set-timeouts", None, None, errno_mod.EINVAL, "negative timeout")
    argv = ["ipvsadm", "--set", str(tcp), str(tcp_fin), str(udp)]
    runner = run or (
        lambda a: subprocess.run(list(a), capture_output=True, text=True, check=False, timeout=30)
    )
    try:
        proc = runner(argv)
    except OSError as e:
        raise IpvsError("set-timeouts", None, None, e.errno or 0, str(e)) from e
    if proc.returncode != 0:
        raise IpvsError(
            "set-timeouts", None, None, errno_mod.EINVAL, (proc.stderr or "").strip() or str(argv)
        )
