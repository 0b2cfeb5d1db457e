"""IP sets over netlink (pyroute2's ``IPSet``): create, destroy, list, add, delete, sync.

This module owns every ipset call kproxy makes, the parsing and formatting of
upstream's entry strings, and :class:`IpsetError`, which keeps the failing input.

Entry strings are upstream kube-proxy's (``pkg/proxy/ipvs/ipset``, ``Entry.String``)::

    hash:ip           10.96.0.10
    hash:ip,port      10.96.0.10,udp:53
    hash:ip,port,ip   10.244.1.5,tcp:8080,10.244.1.5
    hash:ip,port,net  1.2.3.4,tcp:80,10.0.0.0/8
    bitmap:port       30080

Invariants:

- Entries are canonical on the way out (:func:`canonical_entry`: compressed IP
  text, lower-case protocol, a network address with its host bits cleared, as the
  kernel stores it), and callers' entries are canonicalised on the way in, so
  :meth:`Ipset.sync_entries` compares like with like and sends only the difference.
- Every verb is one netlink request, never an ``ipset`` exec; an entry list is one
  dump.  Creation is idempotent for the same type and family (``-exist``), adding
  an existing entry is not an error (``-exist``), deleting a missing one is
  (``IPSET_ERR_EXIST``, as ``ipset del``).
- Sets are created as upstream does: hash types with ``hashsize 1024 maxelem
  65536`` in the set's family, ``bitmap:port`` with ``range 0-65535`` and no family.
- One pyroute2 socket per :class:`Ipset`, opened in the constructor, used only
  from the thread that opened it (pyroute2 opens a new socket per thread, in that
  thread's network namespace: using the handle from another thread is refused
  rather than silently talking to another namespace).  The handle works in the
  network namespace it was created in; the proxy runs inside the node's.  The sync
  API must not be called from a running asyncio loop.
"""

from __future__ import annotations

import errno as errno_mod
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, Final, Literal, Protocol, get_args

from pyroute2 import IPSet
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle
from kproxy.kernel.netlink import AckedSender, BatchOutcome

__all__ = [
    "ERR_EXIST",
    "ERR_PROTOCOL",
    "SET_TYPES",
    "Family",
    "Ipset",
    "IpsetBatchResult",
    "IpsetError",
    "IpsetVerbs",
    "SetInfo",
    "SetType",
    "canonical_entries",
    "canonical_entry",
]

SetType = Literal["hash:ip", "hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net", "bitmap:port"]
Family = Literal["ipv4", "ipv6"]
SET_TYPES: Final[tuple[SetType, ...]] = get_args(SetType)

# Kernel ipset error codes (uapi ipset.h) that the verbs surface unchanged.
ERR_PROTOCOL: Final = 4097  # e.g. an IPv4 address sent to an IPv6 set
ERR_EXIST: Final = 4103  # deleting an entry that is not in the set

HASHSIZE: Final = 1024
MAXELEM: Final = 65536
PORT_RANGE: Final = (0, 65535)

_AF: Final[dict[Family, int]] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
_FAMILY_OF_AF: Final[dict[int, Family]] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PROTO_NUM: Final = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
_PROTO_NAME: Final = {n: p for p, n in _PROTO_NUM.items()}
_ETYPE: Final[dict[SetType, str]] = {
    "hash:ip": "ip",
    "hash:ip,port": "ip,port",
    "hash:ip,port,ip": "ip,port,ip",
    "hash:ip,port,net": "ip,port,net",
    "bitmap:port": "port",
}
_IP_ATTR: Final = {
    socket.AF_INET: "IPSET_ATTR_IPADDR_IPV4",
    socket.AF_INET6: "IPSET_ATTR_IPADDR_IPV6",
}
_LIST_HEADER_FLAG: Final = 1 << 2  # IPSET_FLAG_LIST_HEADER: names, types, families only


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What a set is: its type and, for hash types, its family (None for bitmap:port)."""

    type: SetType
    family: Family | None


class IpsetError(KProxyError):
    """An ipset verb failed; keeps the verb, the set, the entry and the kernel's code.

    ``errno`` is an errno (ENOENT: no such set, EEXIST: a set of another type has
    that name, EINVAL: a malformed entry) or one of the kernel's ipset codes
    (:data:`ERR_EXIST`, :data:`ERR_PROTOCOL`, ...).
    """

    def __init__(
        self, verb: str, name: str | None, entry: str | None, errno: int, reason: str = ""
    ) -> None:
        self.verb = verb
        self.name = name
        self.entry = entry
        self.errno = errno
        self.reason = reason or (errno_mod.errorcode.get(errno, "") if errno else "")
        words = [f"ipset {verb}", *(x for x in (name, entry) if x is not None)]
        super().__init__(f"{' '.join(words)}: {self.reason} (errno {errno})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its fields (tests run the real verbs in a child process).
        return (type(self), (self.verb, self.name, self.entry, self.errno, self.reason))


class IpsetVerbs(Protocol):
    """The verbs the IPVS proxy mode needs; :class:`Ipset` and the fake implement them."""

    def create(self, name: str, set_type: SetType, family: Family = "ipv4") -> None: ...
    def destroy(self, name: str) -> None: ...
    def list_sets(self) -> dict[str, SetInfo]: ...
    def list_entries(self, name: str) -> set[str]: ...
    def add_entry(self, name: str, entry: str) -> None: ...
    def delete_entry(self, name: str, entry: str) -> None: ...
    def sync_entries(self, name: str, desired: Iterable[str]) -> tuple[set[str], set[str]]: ...
    def add_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult: ...
    def delete_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IpsetBatchResult(BatchOutcome):
    """What one batch verb did: the canonical entries that took effect, one
    :class:`IpsetError` per entry the kernel refused, and the netlink traffic."""

    done: frozenset[str]
    failures: tuple[IpsetError, ...] = ()
    messages: int = 0
    round_trips: int = 0


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


def _entry_arg(set_type: SetType, parsed: _Parsed) -> Any:
    # pyroute2 splits a string entry on commas, which cannot carry "proto:port":
    # multi-part entries go as tuples with a PortEntry (reference §3.4).
    if set_type == "bitmap:port":
        return parsed[0]
    if set_type == "hash:ip":
        return str(parsed[0])
    port = PortEntry(parsed[2], protocol=_PROTO_NUM[parsed[1]])
    if set_type == "hash:ip,port":
        return (str(parsed[0]), port)
    return (str(parsed[0]), port, str(parsed[3]))


def _entry_from_data(set_type: SetType, data: Any) -> str:
    def ip_of(nla_name: str) -> str:
        nested = data.get_attr(nla_name)
        for name in _IP_ATTR.values():
            value = nested.get_attr(name)
            if value is not None:
                return str(ip_address(value))
        raise ValueError(f"{nla_name} without an address")

    # IPSET_ATTR_PORT and IPSET_ATTR_PORT_FROM share one attribute id.
    port = data.get_attr("IPSET_ATTR_PORT_FROM")
    if port is None:
        port = data.get_attr("IPSET_ATTR_PORT")
    if set_type == "bitmap:port":
        return str(port)
    first = ip_of("IPSET_ATTR_IP_FROM")
    if set_type == "hash:ip":
        return first
    proto = int(data.get_attr("IPSET_ATTR_PROTO"))
    head = f"{first},{_PROTO_NAME.get(proto, str(proto))}:{port}"
    if set_type == "hash:ip,port":
        return head
    second = ip_of("IPSET_ATTR_IP2")
    if set_type == "hash:ip,port,ip":
        return f"{head},{second}"
    return f"{head},{second}/{int(data.get_attr('IPSET_ATTR_CIDR2'))}"


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


# --- the handle -----------------------------------------------------------------------


class Ipset(SocketHandle):
    """One ipset netlink socket and the verbs over it (see the module docstring)."""

    def __init__(self) -> None:
        self._closed = False
        self._thread = threading.get_ident()
        self._info: dict[str, SetInfo] = {}
        try:
            self._sock: Any = IPSet()
        except NetlinkError as e:
            raise IpsetError("open", None, None, e.code, "no ip_set netlink subsystem?") from e
        except OSError as e:
            raise IpsetError("open", None, None, e.errno or 0, str(e)) from e
        try:
            self._batch = AckedSender(_NETLINK_NETFILTER)
        except OSError as e:
            self._sock.close()
            raise IpsetError("open", None, None, e.errno or 0, str(e)) from e

    @property
    def messages_sent(self) -> int:
        """Requests sent by the batch verbs over the handle's life."""
        return self._batch.messages_sent

    @property
    def round_trips(self) -> int:
        return self._batch.round_trips

    def close(self) -> None:
        if not self._closed:
            self._batch.close()
        super().close()

    def _call(
        self, verb: str, name: str | None, entry: str | None, fn: Any, *a: Any, **kw: Any
    ) -> Any:
        if self._closed:
            raise IpsetError(verb, name, entry, errno_mod.EBADF, "handle is closed")
        if threading.get_ident() != self._thread:
            raise IpsetError(verb, name, entry, errno_mod.EBADF, "handle used from another thread")
        try:
            out = fn(*a, **kw)
            # list() returns a generator: drain it here so its errors carry the input.
            return list(out) if not isinstance(out, (tuple, list)) and out is not None else out
        except NetlinkError as e:
            raise IpsetError(verb, name, entry, e.code) from e
        except OSError as e:
            raise IpsetError(verb, name, entry, e.errno or 0, str(e)) from e

    def create(self, name: str, set_type: SetType, family: Family = "ipv4") -> None:
        """Create ``name`` unless it exists with the same type and family (``-exist``)."""
        if set_type not in SET_TYPES:
            raise IpsetError("create", name, None, errno_mod.EINVAL, f"unsupported type {set_type}")
        if set_type == "bitmap:port":
            self._call(
                "create", name, None, self._sock.create, name, stype=set_type,
                bitmap_ports_range=PORT_RANGE, exclusive=False,
            )  # fmt: skip
            self._info[name] = SetInfo(set_type, None)
            return
        self._call(
            "create", name, None, self._sock.create, name, stype=set_type, family=_AF[family],
            hashsize=HASHSIZE, maxelem=MAXELEM, exclusive=False,
        )  # fmt: skip
        self._info[name] = SetInfo(set_type, family)

    def destroy(self, name: str) -> None:
        """Destroy ``name`` (ENOENT if absent; IPSET_ERR_BUSY while iptables uses it)."""
        self._call("destroy", name, None, self._sock.destroy, name)
        self._info.pop(name, None)

    def list_sets(self) -> dict[str, SetInfo]:
        """Every set in this namespace with its type and family (headers only, no members)."""
        msgs = self._call("list-sets", None, None, self._sock.list, flags=_LIST_HEADER_FLAG)
        out: dict[str, SetInfo] = {}
        for m in msgs:
            name, stype = m.get_attr("IPSET_ATTR_SETNAME"), m.get_attr("IPSET_ATTR_TYPENAME")
            if stype in SET_TYPES:  # sets of other types are not ours: listed without detail
                out[name] = SetInfo(stype, _FAMILY_OF_AF.get(m.get_attr("IPSET_ATTR_FAMILY")))
        return out

    def _set_info(self, verb: str, name: str, entry: str | None) -> SetInfo:
        info = self._info.get(name)
        if info is not None:
            return info
        # A set this handle did not create (e.g. before a restart): ask the kernel.
        msgs = self._call(verb, name, entry, self._sock.list, name, flags=_LIST_HEADER_FLAG)
        for m in msgs:
            stype = m.get_attr("IPSET_ATTR_TYPENAME")
            if stype not in SET_TYPES:
                raise IpsetError(verb, name, entry, errno_mod.EINVAL, f"unsupported type {stype}")
            info = SetInfo(stype, _FAMILY_OF_AF.get(m.get_attr("IPSET_ATTR_FAMILY")))
            self._info[name] = info
            return info
        raise IpsetError(verb, name, entry, errno_mod.ENOENT)

    def list_entries(self, name: str) -> set[str]:
        """The members of ``name`` as canonical entry strings (one dump)."""
        info = self._set_info("list", name, None)
        out: set[str] = set()
        for m in self._call("list", name, None, self._sock.list, name):
            adt = m.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                out.add(_entry_from_data(info.type, data))
        return out

    def _adt(self, verb: str, name: str, entry: str) -> tuple[SetInfo, str, Any]:
        info = self._set_info(verb, name, entry)
        try:
            parsed = parse_entry(info.type, entry, info.family)
        except ValueError as e:
            raise IpsetError(verb, name, entry, errno_mod.EINVAL, str(e)) from e
        return info, format_entry(info.type, parsed), _entry_arg(info.type, parsed)

    def add_entry(self, name: str, entry: str) -> None:
        """Add ``entry`` to ``name``; already present is fine (``-exist``)."""
        info, text, arg = self._adt("add", name, entry)
        af = _AF[info.family] if info.family else socket.AF_INET
        self._call(
            "add", name, text, self._sock.add, name, arg, family=af,
            etype=_ETYPE[info.type], exclusive=False,
        )  # fmt: skip

    def delete_entry(self, name: str, entry: str) -> None:
        """Remove ``entry`` from ``name``; :data:`ERR_EXIST` if it is not there."""
        info, text, arg = self._adt("delete", name, entry)
        af = _AF[info.family] if info.family else socket.AF_INET
        self._call(
            "delete", name, text, self._sock.delete, name, arg, family=af,
            etype=_ETYPE[info.type], exclusive=True,
        )  # fmt: skip

    def sync_entries(self, name: str, desired: Iterable[str]) -> tuple[set[str], set[str]]:
        """Make ``name`` hold exactly ``desired``: one dump, then the difference in batches.

        Returns the canonical entries (added, removed).  Deletions go first, so a
        full set (maxelem) makes room before it grows.  Every difference is tried;
        the first refused one is raised afterwards.
        """
        info = self._set_info("sync", name, None)
        want = canonical_entries("sync", name, info, desired)
        have = self.list_entries(name)
        added, removed = want - have, have - want
        self.delete_entries(name, sorted(removed)).raise_for_failures()
        self.add_entries(name, sorted(added)).raise_for_failures()
        return added, removed

    def add_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult:
        """Add every entry (``-exist``), many requests per round trip.

        Every entry is validated before anything is sent (a malformed one raises
        and changes nothing); the kernel's refusals come back per entry.
        """
        return self._batch_adt("add", _IPSET_CMD_ADD, name, entries, exclusive=False)

    def delete_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult:
        """Remove every entry; one that is not there fails alone with :data:`ERR_EXIST`."""
        return self._batch_adt("delete", _IPSET_CMD_DEL, name, entries, exclusive=True)

    def _batch_adt(
        self, verb: str, cmd: int, name: str, entries: Iterable[str], *, exclusive: bool
    ) -> IpsetBatchResult:
        self._call(verb, name, None, lambda: None)  # closed / wrong-thread checks
        info = self._set_info(verb, name, None)
        parsed: dict[str, _Parsed] = {}
        for entry in entries:
            try:
                p = parse_entry(info.type, entry, info.family)
            except ValueError as e:
                raise IpsetError(verb, name, entry, errno_mod.EINVAL, str(e)) from e
            parsed.setdefault(format_entry(info.type, p), p)
        by_seq: dict[int, str] = {}
        requests: list[tuple[int, bytes]] = []
        for text, p in parsed.items():
            seq = self._batch.next_seq()
            by_seq[seq] = text
            requests.append((seq, encode_adt(cmd, name, info, p, seq, exclusive)))
        sent0, trips0 = self._batch.messages_sent, self._batch.round_trips
        try:
            failed = self._batch.send(requests)
        except TimeoutError as e:
            raise IpsetError(verb, name, None, errno_mod.ETIMEDOUT, "no answer") from e
        except OSError as e:  # ENOBUFS: the kernel dropped acks
            raise IpsetError(verb, name, None, e.errno or 0, str(e)) from e
        failures = tuple(IpsetError(verb, name, by_seq[s], code) for s, code in failed.items())
        refused = {f.entry for f in failures}
        return IpsetBatchResult(
            done=frozenset(t for t in parsed if t not in refused),
            failures=failures,
            messages=self._batch.messages_sent - sent0,
            round_trips=self._batch.round_trips - trips0,
        )


def canonical_entries(verb: str, name: str, info: SetInfo, entries: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for entry in entries:
        try:
            out.add(canonical_entry(info.type, entry, info.family))
        except ValueError as e:
            # All entries are checked before anything is sent: a bad one changes nothing.
            raise IpsetError(verb, name, entry, errno_mod.EINVAL, str(e)) from e
    return out
