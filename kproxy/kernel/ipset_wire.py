"""The ipset wire format: upstream's entry strings and the requests of the batch verbs.

This module owns what :mod:`kproxy.kernel.ipset` sends and reads without pyroute2:
the set types and families, the parsing and formatting of entry strings, the
hand-encoded ``IPSET_CMD_ADD``/``DEL``/``CREATE``/``TYPE``/``LIST`` requests (uapi
``ipset.h`` layout, packed with :mod:`struct`) and the decoding of a dump's
members.  It does no I/O; its underscored names are shared with
:mod:`kproxy.kernel.ipset` only.

Entry strings are upstream kube-proxy's (``pkg/proxy/ipvs/ipset``, ``Entry.String``)::

    hash:ip           10.96.0.10
    hash:ip,port      10.96.0.10,udp:53
    hash:ip,port,ip   10.244.1.5,tcp:8080,10.244.1.5
    hash:ip,port,net  1.2.3.4,tcp:80,10.0.0.0/8
    bitmap:port       30080

Invariants:

- Entries are canonical on the way out (:func:`canonical_entry`: compressed IP
  text, lower-case protocol, a network address with its host bits cleared, as the
  kernel stores it); :func:`decode_entry` reads a dump's members in that form.
- Sets are created as upstream does: hash types with ``hashsize 1024 maxelem
  65536`` in the set's family, ``bitmap:port`` with ``range 0-65535`` and no family.
- :class:`AdtEncoder` writes exactly what :func:`encode_adt` writes, and
  :func:`encode_create` the attributes pyroute2's ``IPSet.create`` sends.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, Final, Literal, get_args

__all__ = [
    "HASHSIZE",
    "MAXELEM",
    "PORT_RANGE",
    "SET_TYPES",
    "AdtEncoder",
    "Family",
    "SetInfo",
    "SetType",
    "canonical_entry",
    "decode_entry",
    "encode_adt",
    "encode_create",
    "encode_list_all",
    "encode_type",
    "format_entry",
    "parse_entry",
]

SetType = Literal["hash:ip", "hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net", "bitmap:port"]
Family = Literal["ipv4", "ipv6"]
SET_TYPES: Final[tuple[SetType, ...]] = get_args(SetType)

HASHSIZE: Final = 1024
MAXELEM: Final = 65536
PORT_RANGE: Final = (0, 65535)

_AF: Final[dict[Family, int]] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_FAMILY_OF_AF: Final[dict[int, Family]] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PROTO_NUM: Final = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
_PROTO_NAME: Final = {n: p for p, n in _PROTO_NUM.items()}


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What a set is: its type and, for hash types, its family (None for bitmap:port)."""

    type: SetType
    family: Family | None


# --- entry strings --------------------------------------------------------------------

_Parsed = tuple[Any, ...]


def _ip(text: str, family: Family | None) -> IPv4Address | IPv6Address:
    addr = ip_address(text)
    if family is not None and addr.version != (4 if family == "ipv4" else 6):
        raise ValueError(f"{text} is not an {family} address")
    return addr


def _proto_port(text: str) -> tuple[str, int]:
    proto, sep, port = text.partition(":")
    proto = proto.lower()
    if not sep or proto not in _PROTO_NUM:
        raise ValueError(f"expected tcp|udp|sctp:PORT, got {text!r}")
    number = int(port)
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"port out of range: {number}")
    return proto, number


def parse_entry(set_type: SetType, entry: str, family: Family | None = None) -> _Parsed:
    """``entry`` split into typed parts for ``set_type``; ValueError if malformed."""
    if set_type == "bitmap:port":
        port = int(entry)
        if not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
            raise ValueError(f"port out of range: {port}")
        return (port,)
    parts = entry.split(",")
    want = {"hash:ip": 1, "hash:ip,port": 2, "hash:ip,port,ip": 3, "hash:ip,port,net": 3}
    if len(parts) != want[set_type]:
        raise ValueError(f"{entry!r} is not a {set_type} entry")
    first = _ip(parts[0], family)
    fam: Family = "ipv4" if first.version == 4 else "ipv6"
    if set_type == "hash:ip":
        return (first,)
    proto, port = _proto_port(parts[1])
    if set_type == "hash:ip,port":
        return (first, proto, port)
    if set_type == "hash:ip,port,ip":
        return (first, proto, port, _ip(parts[2], fam))
    net = ip_network(parts[2], strict=False)  # the kernel clears host bits too
    if net.version != first.version:
        raise ValueError(f"{parts[2]} is not an {fam} network")
    return (first, proto, port, net)


def format_entry(set_type: SetType, parsed: _Parsed) -> str:
    if set_type == "bitmap:port":
        return str(parsed[0])
    if set_type == "hash:ip":
        return str(parsed[0])
    head = f"{parsed[0]},{parsed[1]}:{parsed[2]}"
    return head if set_type == "hash:ip,port" else f"{head},{parsed[3]}"


def canonical_entry(set_type: SetType, entry: str, family: Family | None = None) -> str:
    """``entry`` as the kernel lists it back; ValueError if malformed for ``set_type``."""
    return format_entry(set_type, parse_entry(set_type, entry, family))


# --- hand-encoded ADD/DEL requests (the batch verbs) ------------------------------------
# pyroute2 encodes one message per call through its generic NLA machinery and waits
# for its ack; the batch verbs pack the requests themselves (uapi ipset.h layout).

_NETLINK_NETFILTER: Final = 12
_NFNL_SUBSYS_IPSET: Final = 6
_IPSET_CMD_ADD: Final = 9
_IPSET_CMD_DEL: Final = 10
_IPSET_PROTOCOL: Final = 6  # the kernel accepts 6..7; pyroute2 sends 6
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_EXCL: Final = 0x200  # without it the kernel applies ``-exist``
_NLA_F_NESTED: Final = 0x8000
_NLA_F_NET_BYTEORDER: Final = 0x4000
_A_PROTOCOL, _A_SETNAME, _A_DATA = 1, 2, 7
_A_IP, _A_PORT, _A_PROTO, _A_IP2, _A_CIDR2 = 1, 4, 7, 20, 21
_A_IPADDR_IPV4, _A_IPADDR_IPV6 = 1, 2
_HDR: Final = struct.Struct("=IHHII")
_NFGEN: Final = struct.Struct("=BBH")
_NLA: Final = struct.Struct("=HH")


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _nla_ip(kind: int, addr: IPv4Address | IPv6Address) -> bytes:
    inner = _A_IPADDR_IPV4 if addr.version == 4 else _A_IPADDR_IPV6
    return _nla(kind | _NLA_F_NESTED, _nla(inner | _NLA_F_NET_BYTEORDER, addr.packed))


def _data_attrs(set_type: SetType, parsed: _Parsed) -> bytes:
    if set_type == "bitmap:port":
        return _nla(_A_PORT | _NLA_F_NET_BYTEORDER, struct.pack(">H", parsed[0]))
    out = _nla_ip(_A_IP, parsed[0])
    if set_type == "hash:ip":
        return out
    out += _nla(_A_PORT | _NLA_F_NET_BYTEORDER, struct.pack(">H", parsed[2]))
    out += _nla(_A_PROTO, bytes((_PROTO_NUM[parsed[1]],)))
    if set_type == "hash:ip,port,ip":
        out += _nla_ip(_A_IP2, parsed[3])
    elif set_type == "hash:ip,port,net":
        out += _nla_ip(_A_IP2, parsed[3].network_address)
        out += _nla(_A_CIDR2, bytes((parsed[3].prefixlen,)))
    return out


def encode_adt(
    cmd: int, name: str, info: SetInfo, parsed: _Parsed, seq: int, exclusive: bool
) -> bytes:
    """One IPSET_CMD_ADD/DEL request for one entry (with ``NLM_F_ACK``)."""
    head = _nla(_A_PROTOCOL, bytes((_IPSET_PROTOCOL,))) + _nla(_A_SETNAME, name.encode() + b"\0")
    body = head + _nla(_A_DATA | _NLA_F_NESTED, _data_attrs(info.type, parsed))
    flags = _NLM_F_REQUEST | _NLM_F_ACK | (_NLM_F_EXCL if exclusive else 0)
    af = _AF[info.family] if info.family else socket.AF_INET
    size = _HDR.size + _NFGEN.size + len(body)
    kind = (_NFNL_SUBSYS_IPSET << 8) | cmd
    return _HDR.pack(size, kind, flags, seq, 0) + _NFGEN.pack(af, 0, 0) + body


class AdtEncoder:
    """:func:`encode_adt` for one set and verb, byte for byte, cheaper for big batches.

    A full sync adds one entry per Service to two IPv4 sets (``hash:ip,port`` and
    ``hash:ip``): for those, an entry already in canonical form is checked with
    ``inet_pton``/``inet_ntop`` instead of :mod:`ipaddress` and encoded with ONE
    precompiled pack after a per-batch prefix.  Anything else (IPv6, other types,
    a non-canonical spelling) takes the general parser; :meth:`fast` says None.
    """

    __slots__ = ("_af", "_flags", "_head", "_kind", "_type")

    def __init__(self, cmd: int, name: str, info: SetInfo, exclusive: bool) -> None:
        self._type = info.type if info.family == "ipv4" else None
        self._af = _AF[info.family] if info.family else socket.AF_INET
        self._kind = (_NFNL_SUBSYS_IPSET << 8) | cmd
        self._flags = _NLM_F_REQUEST | _NLM_F_ACK | (_NLM_F_EXCL if exclusive else 0)
        self._head = _nla(_A_PROTOCOL, bytes((_IPSET_PROTOCOL,))) + _nla(
            _A_SETNAME, name.encode() + b"\0"
        )

    def fast(self, entry: str) -> bytes | None:
        """The DATA attribute of a canonical IPv4 ``hash:ip``/``hash:ip,port`` entry."""
        if self._type == "hash:ip":
            raw = _canonical_v4(entry)
            return None if raw is None else _DATA_IP.pack(*_IP_DATA_HEAD, raw)
        if self._type != "hash:ip,port":
            return None
        ip, _, rest = entry.partition(",")
        proto, _, port = rest.partition(":")
        number = _PROTO_NUM.get(proto)
        raw = _canonical_v4(ip)
        if raw is None or number is None or not port.isdigit() or str(int(port)) != port:
            return None
        value = int(port)
        if value > 0xFFFF:
            return None
        return _DATA_IP_PORT.pack(
            *_IP_PORT_DATA_HEAD, raw, 6, _A_PORT | _NLA_F_NET_BYTEORDER, socket.htons(value),
            5, _A_PROTO, number,
        )  # fmt: skip

    def message(self, data: bytes, seq: int) -> bytes:
        size = _HDR.size + _NFGEN.size + len(self._head) + len(data)
        head = _HDR_NFGEN.pack(size, self._kind, self._flags, seq, 0, self._af, 0, 0)
        return head + self._head + data


def _canonical_v4(text: str) -> bytes | None:
    try:
        raw = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return None
    return raw if socket.inet_ntop(socket.AF_INET, raw) == text else None


# DATA{IP{IPADDR_IPV4}} and DATA{IP{IPADDR_IPV4}, PORT, PROTO}, as _data_attrs writes them.
_HDR_NFGEN: Final = struct.Struct("=IHHIIBBH")
_DATA_IP: Final = struct.Struct("=HHHHHH4s")
_IP_DATA_HEAD: Final = (
    16, _A_DATA | _NLA_F_NESTED, 12, _A_IP | _NLA_F_NESTED, 8,
    _A_IPADDR_IPV4 | _NLA_F_NET_BYTEORDER,
)  # fmt: skip
_DATA_IP_PORT: Final = struct.Struct("=HHHHHH4sHHH2xHHB3x")
_IP_PORT_DATA_HEAD: Final = (
    32, _A_DATA | _NLA_F_NESTED, 12, _A_IP | _NLA_F_NESTED, 8,
    _A_IPADDR_IPV4 | _NLA_F_NET_BYTEORDER,
)  # fmt: skip


# --- hand-encoded CREATE / TYPE / LIST (create_many, list_all_entries) ------------------
# The same attributes, in the same order, as pyroute2's ``IPSet.create`` (checked
# with strace): PROTOCOL, SETNAME, TYPENAME, FAMILY, REVISION, DATA{MAXELEM,
# HASHSIZE} or DATA{PORT_FROM, PORT_TO}, nfgen family AF_INET.  The only difference
# is PROTOCOL 6 instead of the kernel's 7: the kernel accepts 6..7 and nothing in
# a create depends on it (``ipset list -t`` shows identical sets).

_IPSET_CMD_CREATE: Final = 2
_IPSET_CMD_LIST: Final = 7
_IPSET_CMD_TYPE: Final = 13
_NLM_F_DUMP: Final = 0x300
_A_TYPENAME, _A_REVISION, _A_FAMILY, _A_ADT = 3, 4, 5, 8
_A_PORT_TO, _A_HASHSIZE, _A_MAXELEM = 5, 18, 19
_NLA_TYPE_MASK: Final = ~(_NLA_F_NESTED | _NLA_F_NET_BYTEORDER) & 0xFFFF


def _message(cmd: int, flags: int, seq: int, body: bytes) -> bytes:
    size = _HDR.size + _NFGEN.size + len(body)
    kind = (_NFNL_SUBSYS_IPSET << 8) | cmd
    # pyroute2 sends nfgen family AF_INET for every ipset request; the kernel reads
    # the set's family from IPSET_ATTR_FAMILY instead.
    return _HDR.pack(size, kind, flags, seq, 0) + _NFGEN.pack(socket.AF_INET, 0, 0) + body


def _nla_str(kind: int, text: str) -> bytes:
    return _nla(kind, text.encode() + b"\0")


def encode_type(set_type: SetType, seq: int) -> bytes:
    """One IPSET_CMD_TYPE request: the kernel answers with the type's newest revision."""
    body = _nla(_A_PROTOCOL, bytes((_IPSET_PROTOCOL,))) + _nla_str(_A_TYPENAME, set_type)
    # Family AF_INET for every type, as pyroute2 asks (upstream's types are not per family).
    body += _nla(_A_FAMILY, bytes((socket.AF_INET,)))
    return _message(_IPSET_CMD_TYPE, _NLM_F_REQUEST | _NLM_F_ACK, seq, body)


def encode_create(name: str, info: SetInfo, revision: int, seq: int) -> bytes:
    """One IPSET_CMD_CREATE request without ``NLM_F_EXCL`` (``-exist``), as :meth:`Ipset.create`."""
    if info.type == "bitmap:port":
        # pyroute2 sends AF_INET for bitmap:port; the kernel stores no family for it.
        af: int = socket.AF_INET
        data = _nla(_A_PORT | _NLA_F_NET_BYTEORDER, struct.pack(">H", PORT_RANGE[0]))
        data += _nla(_A_PORT_TO | _NLA_F_NET_BYTEORDER, struct.pack(">H", PORT_RANGE[1]))
    else:
        af = _AF[info.family or "ipv4"]
        data = _nla(_A_MAXELEM | _NLA_F_NET_BYTEORDER, struct.pack(">I", MAXELEM))
        data += _nla(_A_HASHSIZE | _NLA_F_NET_BYTEORDER, struct.pack(">I", HASHSIZE))
    body = _nla(_A_PROTOCOL, bytes((_IPSET_PROTOCOL,))) + _nla_str(_A_SETNAME, name)
    body += _nla_str(_A_TYPENAME, info.type) + _nla(_A_FAMILY, bytes((af,)))
    body += _nla(_A_REVISION, bytes((revision,))) + _nla(_A_DATA | _NLA_F_NESTED, data)
    return _message(_IPSET_CMD_CREATE, _NLM_F_REQUEST | _NLM_F_ACK, seq, body)


def encode_list_all(seq: int) -> bytes:
    """One IPSET_CMD_LIST dump request without a set name: every set, headers and members."""
    body = _nla(_A_PROTOCOL, bytes((_IPSET_PROTOCOL,)))
    return _message(_IPSET_CMD_LIST, _NLM_F_REQUEST | _NLM_F_DUMP, seq, body)


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in ``data[start:end]``."""
    while start + _NLA.size <= end:
        size, kind = _NLA.unpack_from(data, start)
        if size < _NLA.size:
            return
        yield kind & _NLA_TYPE_MASK, start + _NLA.size, start + size
        start += (size + 3) & ~3


def _first_attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for kind, s, e in _attrs(data, start, end):
        out.setdefault(kind, (s, e))
    return out


def _str_at(data: bytes, span: tuple[int, int]) -> str:
    return data[span[0] : span[1]].split(b"\0", 1)[0].decode()


def _ip_at(data: bytes, span: tuple[int, int]) -> str:
    for kind, s, e in _attrs(data, *span):
        if kind == _A_IPADDR_IPV4:
            return str(IPv4Address(data[s:e]))
        if kind == _A_IPADDR_IPV6:
            return str(IPv6Address(data[s:e]))
    raise ValueError("address attribute without an address")


def decode_entry(set_type: SetType, data: bytes, start: int, end: int) -> str:
    """The canonical entry string of one IPSET_ATTR_DATA payload of a dump."""
    a = _first_attrs(data, start, end)
    port = struct.unpack_from(">H", data, a[_A_PORT][0])[0] if _A_PORT in a else None
    if set_type == "bitmap:port":
        if port is None:
            raise ValueError("bitmap:port entry without a port")
        return str(port)
    first = _ip_at(data, a[_A_IP])
    if set_type == "hash:ip":
        return first
    proto = data[a[_A_PROTO][0]]
    head = f"{first},{_PROTO_NAME.get(proto, str(proto))}:{port}"
    if set_type == "hash:ip,port":
        return head
    second = _ip_at(data, a[_A_IP2])
    if set_type == "hash:ip,port,ip":
        return f"{head},{second}"
    return f"{head},{second}/{data[a[_A_CIDR2][0]]}"
