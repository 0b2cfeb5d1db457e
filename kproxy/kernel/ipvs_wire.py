"""The IPVS generic-netlink wire format: the requests kproxy sends, the dumps it reads.

This module owns :class:`OpKind` and :class:`IpvsOp` (one change, and the command
and flags it is sent with), their encoding (:func:`encode_op`, the reference, and
:class:`Encoder`, its fast twin used by
:class:`~kproxy.kernel.ipvs_batch.IpvsBatch`), and the decoding of service and
destination dumps into :class:`~kproxy.kernel.ipvs.VirtualServer` and
:class:`~kproxy.kernel.ipvs.RealServer`.  It does no I/O; its underscored names
are shared with :mod:`kproxy.kernel.ipvs_batch` only.

Invariants:

- Requests carry the same attributes as :class:`~kproxy.kernel.ipvs.Ipvs` sends
  (scheduler, flags with a full mask, timeout and netmask of a service; forwarding
  method, weight and thresholds of a destination) — never pyroute2's defaults.
  Encoding is by hand with :mod:`struct` (pyroute2's per-message encoder costs more
  than the kernel's work); the unit tests decode it with pyroute2's ``ipvsmsg``.
"""

from __future__ import annotations

import enum
import socket
import struct
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

from kproxy.kernel.ipvs import ForwardingMethod, IPProtocol, RealServer, ServiceFlags, VirtualServer
from kproxy.kernel.netlink import HDR

__all__ = [
    "Encoder",
    "IpvsOp",
    "OpKind",
    "encode_op",
]

IPAddress = IPv4Address | IPv6Address


# netlink / generic netlink / IPVS constants (uapi)
_NLM_F_REQUEST: Final = 0x1
_NLM_F_MULTI: Final = 0x2
_NLM_F_ACK: Final = 0x4
_NLM_F_DUMP: Final = 0x300
_NLM_F_REPLACE: Final = 0x100
_NLM_F_EXCL: Final = 0x200
_NLM_F_CREATE: Final = 0x400
_NETLINK_GENERIC: Final = 16
_NLA_F_NESTED: Final = 0x8000
_NLA_TYPE_MASK: Final = 0x3FFF
_GENL_VERSION: Final = 1

_CMD_NEW_SERVICE, _CMD_SET_SERVICE, _CMD_DEL_SERVICE, _CMD_GET_SERVICE = 1, 2, 3, 4
_CMD_NEW_DEST, _CMD_SET_DEST, _CMD_DEL_DEST, _CMD_GET_DEST = 5, 6, 7, 8
_ATTR_SERVICE, _ATTR_DEST = 1, 2
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT, _SVC_FWMARK = 1, 2, 3, 4, 5
_SVC_SCHED_NAME, _SVC_FLAGS, _SVC_TIMEOUT, _SVC_NETMASK = 6, 7, 8, 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD_METHOD, _DEST_WEIGHT = 1, 2, 3, 4
_DEST_U_THRESH, _DEST_L_THRESH, _DEST_ACTIVE, _DEST_INACTIVE = 5, 6, 7, 8
_DEST_ADDR_FAMILY = 11
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_FULL_MASK: Final = 0xFFFFFFFF

_GENL = struct.Struct("=BBH")  # genlmsghdr: cmd, version, reserved
_NLA = struct.Struct("=HH")


class OpKind(enum.Enum):
    """What an :class:`IpvsOp` does, and the generic-netlink command and flags it sends."""

    ADD_SERVICE = (_CMD_NEW_SERVICE, _NLM_F_CREATE | _NLM_F_EXCL, "add-service")
    EDIT_SERVICE = (_CMD_SET_SERVICE, _NLM_F_REPLACE, "set-service")
    DELETE_SERVICE = (_CMD_DEL_SERVICE, 0, "delete-service")
    ADD_DESTINATION = (_CMD_NEW_DEST, _NLM_F_CREATE | _NLM_F_EXCL, "add-destination")
    EDIT_DESTINATION = (_CMD_SET_DEST, _NLM_F_REPLACE, "set-destination")
    DELETE_DESTINATION = (_CMD_DEL_DEST, 0, "delete-destination")

    @property
    def verb(self) -> str:
        return str(self.value[2])


_DEST_KINDS: Final = frozenset(
    {OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION, OpKind.DELETE_DESTINATION}
)


@dataclass(frozen=True, slots=True)
class IpvsOp:
    """One change: a service verb (``destination`` None) or a destination verb."""

    kind: OpKind
    service: VirtualServer
    destination: RealServer | None = None

    def __post_init__(self) -> None:
        if (self.kind in _DEST_KINDS) != (self.destination is not None):
            need = "needs" if self.kind in _DEST_KINDS else "takes no"
            raise ValueError(f"{self.kind.name} {need} destination")

    def __str__(self) -> str:
        rs = f" {self.destination}" if self.destination is not None else ""
        return f"{self.kind.verb} {self.service}{rs}"

    @classmethod
    def add_service(cls, vs: VirtualServer) -> IpvsOp:
        return cls(OpKind.ADD_SERVICE, vs)

    @classmethod
    def edit_service(cls, vs: VirtualServer) -> IpvsOp:
        return cls(OpKind.EDIT_SERVICE, vs)

    @classmethod
    def delete_service(cls, vs: VirtualServer) -> IpvsOp:
        return cls(OpKind.DELETE_SERVICE, vs)

    @classmethod
    def add_destination(cls, vs: VirtualServer, rs: RealServer) -> IpvsOp:
        return cls(OpKind.ADD_DESTINATION, vs, rs)

    @classmethod
    def edit_destination(cls, vs: VirtualServer, rs: RealServer) -> IpvsOp:
        return cls(OpKind.EDIT_DESTINATION, vs, rs)

    @classmethod
    def delete_destination(cls, vs: VirtualServer, rs: RealServer) -> IpvsOp:
        return cls(OpKind.DELETE_DESTINATION, vs, rs)


# --- encoding ------------------------------------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _u16(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack("=H", value))


def _u32(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack("=I", value))


def _be16(kind: int, value: int) -> bytes:
    return _nla(kind, struct.pack(">H", value))


def _af(address: IPAddress) -> int:
    return _AF_INET6 if address.version == 6 else _AF_INET


def _service_attrs(vs: VirtualServer, full: bool) -> bytes:
    parts = [
        _u16(_SVC_AF, _af(vs.address)),
        _u16(_SVC_PROTOCOL, int(vs.protocol)),
        _nla(_SVC_ADDR, vs.address.packed),
        _be16(_SVC_PORT, vs.port),
    ]
    if full:
        # IPv4: the be32 mask; IPv6: a prefix length the kernel reads as a host u32.
        netmask = (
            struct.pack(">I", vs.netmask)
            if vs.address.version == 4
            else vs.netmask.to_bytes(4, sys.byteorder)
        )
        parts += [
            _nla(_SVC_SCHED_NAME, vs.scheduler.encode() + b"\0"),
            _nla(_SVC_FLAGS, struct.pack("=II", int(vs.flags), _FULL_MASK)),
            _u32(_SVC_TIMEOUT, vs.timeout),
            _nla(_SVC_NETMASK, netmask),
        ]
    return _nla(_ATTR_SERVICE | _NLA_F_NESTED, b"".join(parts))


def _dest_attrs(rs: RealServer, full: bool) -> bytes:
    parts = [
        _nla(_DEST_ADDR, rs.address.packed),
        _be16(_DEST_PORT, rs.port),
        _u16(_DEST_ADDR_FAMILY, _af(rs.address)),
    ]
    if full:
        parts += [
            _u32(_DEST_FWD_METHOD, int(rs.forwarding)),
            _u32(_DEST_WEIGHT, rs.weight),
            _u32(_DEST_U_THRESH, 0),
            _u32(_DEST_L_THRESH, 0),
        ]
    return _nla(_ATTR_DEST | _NLA_F_NESTED, b"".join(parts))


def _message(family_id: int, cmd: int, flags: int, seq: int, body: bytes) -> bytes:
    size = HDR.size + _GENL.size + len(body)
    return HDR.pack(size, family_id, flags, seq, 0) + _GENL.pack(cmd, _GENL_VERSION, 0) + body


def encode_op(op: IpvsOp, family_id: int, seq: int) -> bytes:
    """The generic-netlink request for ``op`` (with ``NLM_F_ACK``)."""
    cmd, extra, _ = op.kind.value
    flags = _NLM_F_REQUEST | _NLM_F_ACK | extra
    if op.destination is None:
        # Deleting a service needs only its key; adding or changing one, everything.
        body = _service_attrs(op.service, full=op.kind is not OpKind.DELETE_SERVICE)
    else:
        full = op.kind is not OpKind.DELETE_DESTINATION
        body = _service_attrs(op.service, full=False) + _dest_attrs(op.destination, full)
    return _message(family_id, cmd, flags, seq, body)


class Encoder:
    """:func:`encode_op`, byte for byte, at a fraction of its cost for big batches.

    A full sync sends ten real-server requests per service: the service's key
    attributes are encoded once and reused, and a real server's header and
    attributes are each ONE precompiled :class:`struct.Struct` pack (the generic
    encoder's dozen small packs and joins were most of a 55,000-request batch's
    time under emulation).  Ports go through :func:`socket.htons`, so the native
    pack writes network order on any host.
    """

    __slots__ = ("_family", "_keys")

    def __init__(self, family_id: int) -> None:
        self._family = family_id
        self._keys: dict[int, tuple[VirtualServer, bytes]] = {}

    def encode(self, op: IpvsOp, seq: int) -> bytes:
        rs = op.destination
        if rs is None:
            return encode_op(op, self._family, seq)
        vs = op.service
        # By identity: a frozen dataclass rehashes every field on each lookup, and the
        # ops of one service share its object.  The entry keeps the object, so its id
        # cannot be reused by another while cached.
        cached = self._keys.get(id(vs))
        if cached is None or cached[0] is not vs:
            cached = self._keys[id(vs)] = (vs, _service_attrs(vs, full=False))
        key = cached[1]
        kind = op.kind
        cmd, flags = _CMD_FLAGS[kind]
        raw = rs.address.packed
        v4 = len(raw) == 4
        if kind is OpKind.DELETE_DESTINATION:
            layout = _DEST_KEY_V4 if v4 else _DEST_KEY_V6
            dest = layout.pack(
                layout.size, _ATTR_DEST | _NLA_F_NESTED, 4 + len(raw), _DEST_ADDR, raw,
                6, _DEST_PORT, socket.htons(rs.port), 6, _DEST_ADDR_FAMILY,
                _AF_INET if v4 else _AF_INET6,
            )  # fmt: skip
        else:
            layout = _DEST_FULL_V4 if v4 else _DEST_FULL_V6
            dest = layout.pack(
                layout.size, _ATTR_DEST | _NLA_F_NESTED, 4 + len(raw), _DEST_ADDR, raw,
                6, _DEST_PORT, socket.htons(rs.port), 6, _DEST_ADDR_FAMILY,
                _AF_INET if v4 else _AF_INET6,
                8, _DEST_FWD_METHOD, rs.forwarding.value, 8, _DEST_WEIGHT, rs.weight,
                8, _DEST_U_THRESH, 0, 8, _DEST_L_THRESH, 0,
            )  # fmt: skip
        size = _HEAD.size + len(key) + len(dest)
        return _HEAD.pack(size, self._family, flags, seq, 0, cmd, _GENL_VERSION, 0) + key + dest


_CMD_FLAGS: Final = {
    kind: (kind.value[0], _NLM_F_REQUEST | _NLM_F_ACK | kind.value[1]) for kind in OpKind
}
# nlmsghdr + genlmsghdr; a real server's nested attributes: key (address, port,
# family) and, for add/edit, forwarding method, weight and both thresholds.
_HEAD: Final = struct.Struct("=IHHIIBBH")
_KEY_LAYOUT: Final = "=HHHH{n}sHHH2xHHH2x"
_DEST_KEY_V4: Final = struct.Struct(_KEY_LAYOUT.format(n=4))
_DEST_KEY_V6: Final = struct.Struct(_KEY_LAYOUT.format(n=16))
_DEST_FULL_V4: Final = struct.Struct(_KEY_LAYOUT.format(n=4) + "HHI" * 4)
_DEST_FULL_V6: Final = struct.Struct(_KEY_LAYOUT.format(n=16) + "HHI" * 4)


# --- decoding ------------------------------------------------------------------------------


def _attrs(buf: bytes | memoryview, start: int, end: int) -> dict[int, memoryview]:
    out: dict[int, memoryview] = {}
    view = memoryview(buf)
    while start + _NLA.size <= end:
        size, kind = _NLA.unpack_from(view, start)
        if size < _NLA.size:
            break
        out[kind & _NLA_TYPE_MASK] = view[start + _NLA.size : start + size]
        start += (size + 3) & ~3
    return out


def _u(value: memoryview | None, fmt: str = "=I", default: int = 0) -> int:
    return default if value is None else int(struct.unpack(fmt, value)[0])


def _addr(family: int, raw: memoryview) -> IPAddress:
    # The kernel sends 16 bytes for either family (union nf_inet_addr).
    return ip_address(bytes(raw[:4]) if family == _AF_INET else bytes(raw[:16]))


def _service_from(nested: memoryview) -> VirtualServer | None:
    a = _attrs(nested, 0, len(nested))
    if _u(a.get(_SVC_FWMARK)):
        return None  # fwmark services are not kproxy's
    family = _u(a[_SVC_AF], "=H")
    raw_mask = bytes(a[_SVC_NETMASK])
    netmask = int.from_bytes(raw_mask, "big" if family == _AF_INET else sys.byteorder)
    return VirtualServer(
        address=_addr(family, a[_SVC_ADDR]),
        port=_u(a[_SVC_PORT], ">H"),
        protocol=IPProtocol(_u(a[_SVC_PROTOCOL], "=H")),
        scheduler=bytes(a[_SVC_SCHED_NAME]).rstrip(b"\0").decode(),
        flags=ServiceFlags(_u(a[_SVC_FLAGS][:4])),
        timeout=_u(a[_SVC_TIMEOUT]),
        netmask=netmask,
    )


def _dest_from(nested: memoryview, service_family: int) -> RealServer:
    a = _attrs(nested, 0, len(nested))
    family = _u(a.get(_DEST_ADDR_FAMILY), "=H", service_family)
    return RealServer(
        address=_addr(family, a[_DEST_ADDR]),
        port=_u(a[_DEST_PORT], ">H"),
        weight=_u(a[_DEST_WEIGHT]),
        forwarding=ForwardingMethod(_u(a[_DEST_FWD_METHOD]) & 0x7),
        active_connections=_u(a.get(_DEST_ACTIVE)),
        inactive_connections=_u(a.get(_DEST_INACTIVE)),
    )
