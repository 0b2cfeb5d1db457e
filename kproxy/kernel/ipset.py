"""IP sets over netlink (pyroute2's ``IPSet``): create, destroy, list, add, delete, sync.

This module owns every ipset call kproxy makes and :class:`IpsetError`, which
keeps the failing input.  Entry strings and the bytes of the batch verbs are
:mod:`kproxy.kernel.ipset_wire`'s.

Invariants:

- Callers' entries are canonicalised on the way in and listed ones are canonical
  on the way out, so :meth:`Ipset.sync_entries` compares like with like and sends
  only the difference.
- Every verb is one netlink request, never an ``ipset`` exec; an entry list is one
  dump.  :meth:`Ipset.create_many` sends every set's create as one batch (one round
  trip, plus one for the kernel's type revisions on the handle's first batch), and
  :meth:`Ipset.list_all_entries` reads every set with its members in one dump.
  Creation is idempotent for the same type and family (``-exist``), adding
  an existing entry is not an error (``-exist``), deleting a missing one is
  (``IPSET_ERR_EXIST``, as ``ipset del``).
- Sets are created with upstream's parameters (see :mod:`kproxy.kernel.ipset_wire`),
  each at the newest revision the kernel has for its type (as pyroute2 and the
  ``ipset`` command pick it): ``create`` and ``create_many`` make identical sets.
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
from ipaddress import ip_address
from typing import Any, Final, Protocol

from pyroute2 import IPSet
from pyroute2.ipset import PortEntry
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle
from kproxy.kernel.ipset_wire import (
    _A_ADT,
    _A_DATA,
    _A_FAMILY,
    _A_REVISION,
    _A_SETNAME,
    _A_TYPENAME,
    _AF,
    _FAMILY_OF_AF,
    _IPSET_CMD_ADD,
    _IPSET_CMD_DEL,
    _NETLINK_NETFILTER,
    _NFGEN,
    _NLA_F_NESTED,
    _PROTO_NAME,
    _PROTO_NUM,
    HASHSIZE,
    MAXELEM,
    PORT_RANGE,
    SET_TYPES,
    AdtEncoder,
    Family,
    SetInfo,
    SetType,
    _attrs,
    _data_attrs,
    _first_attrs,
    _nla,
    _Parsed,
    _str_at,
    canonical_entry,
    decode_entry,
    encode_create,
    encode_list_all,
    encode_type,
    format_entry,
    parse_entry,
)
from kproxy.kernel.netlink import (
    NLMSG_DONE,
    NLMSG_ERROR,
    AckedSender,
    BatchOutcome,
    error_code,
    messages,
)

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
    "create_specs",
]

# Kernel ipset error codes (uapi ipset.h) that the verbs surface unchanged.
ERR_PROTOCOL: Final = 4097  # e.g. an IPv4 address sent to an IPv6 set
ERR_EXIST: Final = 4103  # deleting an entry that is not in the set
_ERR_FIND_TYPE: Final = 4098  # IPSET_ERR_FIND_TYPE: no such type/revision in the kernel

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
    def create_many(self, specs: Iterable[tuple[str, SetType, Family]]) -> IpsetBatchResult: ...
    def list_all_entries(self) -> dict[str, set[str]]: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IpsetBatchResult(BatchOutcome):
    """What one batch verb did: the canonical entries (for ``create_many``, the set
    names) that took effect, one :class:`IpsetError` per entry (set) the kernel
    refused, and the netlink traffic."""

    done: frozenset[str]
    failures: tuple[IpsetError, ...] = ()
    messages: int = 0
    round_trips: int = 0


# --- entries through pyroute2 (the one-request verbs) --------------------------------


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


# --- the handle -----------------------------------------------------------------------


class Ipset(SocketHandle):
    """One ipset netlink socket and the verbs over it (see the module docstring)."""

    def __init__(self) -> None:
        self._closed = False
        self._thread = threading.get_ident()
        self._info: dict[str, SetInfo] = {}
        self._revisions: dict[SetType, int] = {}  # newest per type, asked once per handle
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
        encoder = AdtEncoder(cmd, name, info, exclusive)
        data: dict[str, bytes] = {}  # canonical entry -> its DATA attribute
        for entry in entries:
            fast = encoder.fast(entry)
            if fast is not None:
                data.setdefault(entry, fast)
                continue
            try:
                p = parse_entry(info.type, entry, info.family)
            except ValueError as e:
                raise IpsetError(verb, name, entry, errno_mod.EINVAL, str(e)) from e
            data.setdefault(
                format_entry(info.type, p),
                _nla(_A_DATA | _NLA_F_NESTED, _data_attrs(info.type, p)),
            )
        by_seq: dict[int, str] = {}
        requests: list[tuple[int, bytes]] = []
        for text, attr in data.items():
            seq = self._batch.next_seq()
            by_seq[seq] = text
            requests.append((seq, encoder.message(attr, seq)))
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
            done=frozenset(t for t in data if t not in refused),
            failures=failures,
            messages=self._batch.messages_sent - sent0,
            round_trips=self._batch.round_trips - trips0,
        )

    def create_many(self, specs: Iterable[tuple[str, SetType, Family]]) -> IpsetBatchResult:
        """Create every set as :meth:`create` does, all in one batch.

        ``done`` holds the names created or already there; a set that exists with
        another type fails alone with the kernel's EEXIST (as :meth:`create`), the
        others are still created.  Beware that the kernel, under ``-exist``, accepts
        a hash set of the same type in the other family and keeps the old one (so
        does :meth:`create`).  The handle's first batch also asks the kernel for
        its type revisions (one more round trip, then cached).
        """
        self._call("create", None, None, lambda: None)  # closed / wrong-thread checks
        infos = create_specs(specs)
        sent0, trips0 = self._batch.messages_sent, self._batch.round_trips
        failures: list[IpsetError] = []
        by_seq: dict[int, str] = {}
        requests: list[tuple[int, bytes]] = []
        revisions, refused = self._type_revisions({i.type for i in infos.values()})
        for name, info in infos.items():
            if info.type in refused:
                failures.append(IpsetError("create", name, None, refused[info.type]))
                continue
            seq = self._batch.next_seq()
            by_seq[seq] = name
            requests.append((seq, encode_create(name, info, revisions[info.type], seq)))
        failed = self._send("create", requests)
        failures += (IpsetError("create", by_seq[s], None, code) for s, code in failed.items())
        if any(f.errno == _ERR_FIND_TYPE for f in failures):
            self._revisions.clear()  # a module changed under us: ask again next time
        names = {f.name for f in failures}
        for name in by_seq.values():
            if name not in names:
                self._info[name] = infos[name]
        return IpsetBatchResult(
            done=frozenset(n for n in infos if n not in names),
            failures=tuple(failures),
            messages=self._batch.messages_sent - sent0,
            round_trips=self._batch.round_trips - trips0,
        )

    def _send(self, verb: str, requests: list[tuple[int, bytes]]) -> dict[int, int]:
        try:
            return self._batch.send(requests)
        except TimeoutError as e:
            raise IpsetError(verb, None, None, errno_mod.ETIMEDOUT, "no answer") from e
        except OSError as e:  # ENOBUFS: the kernel dropped acks
            raise IpsetError(verb, None, None, e.errno or 0, str(e)) from e

    def _type_revisions(self, types: set[SetType]) -> tuple[dict[SetType, int], dict[SetType, int]]:
        """The newest revision of each type (cached), and the kernel's code for each
        type it refused (e.g. IPSET_ERR_FIND_TYPE when the module is missing)."""
        refused: dict[SetType, int] = {}
        if types - self._revisions.keys():
            # Every supported type at once (a later batch may need the others): the
            # answers are replies, not acks, so the batch is read here, not by send().
            asked = sorted(set(SET_TYPES) - self._revisions.keys())
            by_seq = {self._batch.next_seq(): t for t in asked}
            try:
                self._batch.send_one(b"".join(encode_type(t, q) for q, t in by_seq.items()))
                self._batch.messages_sent += len(by_seq) - 1  # send_one counts one message
                pending = set(by_seq)
                while pending:
                    data = self._batch.recv()
                    for kind, _flags, seq, start, end in messages(data):
                        if seq not in pending:
                            continue  # a stale answer to an abandoned request
                        if kind == NLMSG_ERROR:
                            pending.discard(seq)  # the ack comes after the reply
                            code = error_code(data, start)
                            if code:
                                refused[by_seq[seq]] = code
                            continue
                        a = _first_attrs(data, start + _NFGEN.size, end)
                        if _A_REVISION in a:
                            self._revisions[by_seq[seq]] = data[a[_A_REVISION][0]]
            except TimeoutError as e:
                raise IpsetError("create", None, None, errno_mod.ETIMEDOUT, "no answer") from e
            except OSError as e:
                raise IpsetError("create", None, None, e.errno or 0, str(e)) from e
        for t in types - self._revisions.keys():
            refused.setdefault(t, _ERR_FIND_TYPE)  # acked without a revision: not expected
        return {t: self._revisions[t] for t in types if t in self._revisions}, refused

    def list_all_entries(self) -> dict[str, set[str]]:
        """Every set of a supported type with its canonical members: one dump.

        Sets of other types are left out.  The kernel continues a big set over
        several messages (only the first carries the header), so members are
        merged by set name.
        """
        verb = "list-all"
        self._call(verb, None, None, lambda: None)  # closed / wrong-thread checks
        infos: dict[str, SetInfo | None] = {}
        out: dict[str, set[str]] = {}
        seq = self._batch.next_seq()
        try:
            self._batch.send_one(encode_list_all(seq))
            done = False
            while not done:
                data = self._batch.recv()
                for kind, _flags, mseq, start, end in messages(data):
                    if mseq != seq:
                        continue  # a stale answer to an abandoned request
                    if kind in (NLMSG_DONE, NLMSG_ERROR):
                        code = error_code(data, start) if kind == NLMSG_ERROR else 0
                        if code:
                            raise IpsetError(verb, None, None, code)
                        done = True
                        break
                    self._read_set_part(data, start + _NFGEN.size, end, infos, out)
        except TimeoutError as e:
            raise IpsetError(verb, None, None, errno_mod.ETIMEDOUT, "no answer") from e
        except OSError as e:
            raise IpsetError(verb, None, None, e.errno or 0, str(e)) from e
        return out

    def _read_set_part(
        self,
        data: bytes,
        start: int,
        end: int,
        infos: dict[str, SetInfo | None],
        out: dict[str, set[str]],
    ) -> None:
        a = _first_attrs(data, start, end)
        if _A_SETNAME not in a:
            return  # every part of a set names it; anything else is not a set
        name = _str_at(data, a[_A_SETNAME])
        if _A_TYPENAME in a:  # a set's first message: its header
            stype = _str_at(data, a[_A_TYPENAME])
            family = data[a[_A_FAMILY][0]] if _A_FAMILY in a else 0
            info = SetInfo(stype, _FAMILY_OF_AF.get(family)) if stype in SET_TYPES else None
            infos[name] = info
            if info is not None:
                self._info[name] = info
                out[name] = set()
        info = infos.get(name)
        if info is None or _A_ADT not in a:
            return  # another type's set (not ours), or a header without members
        members = out[name]
        for kind, s, e in _attrs(data, *a[_A_ADT]):
            if kind != _A_DATA:
                continue
            try:
                members.add(decode_entry(info.type, data, s, e))
            except (KeyError, ValueError, struct.error) as err:
                raise IpsetError("list-all", name, None, errno_mod.EPROTO, str(err)) from err


def create_specs(specs: Iterable[tuple[str, SetType, Family]]) -> dict[str, SetInfo]:
    """``create_many``'s specs as infos by name, checked before anything is sent.

    An unsupported type or family, or one name asked for twice with different
    types, raises :class:`IpsetError` (EINVAL) and creates nothing.
    """
    out: dict[str, SetInfo] = {}
    for name, set_type, family in specs:
        if set_type not in SET_TYPES:
            raise IpsetError("create", name, None, errno_mod.EINVAL, f"unsupported type {set_type}")
        if family not in _AF:
            raise IpsetError("create", name, None, errno_mod.EINVAL, f"unsupported family {family}")
        info = SetInfo(set_type, None if set_type == "bitmap:port" else family)
        if out.setdefault(name, info) != info:
            raise IpsetError("create", name, None, errno_mod.EINVAL, "asked for with two types")
    return out


def canonical_entries(verb: str, name: str, info: SetInfo, entries: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for entry in entries:
        try:
            out.add(canonical_entry(info.type, entry, info.family))
        except ValueError as e:
            # All entries are checked before anything is sent: a bad one changes nothing.
            raise IpsetError(verb, name, entry, errno_mod.EINVAL, str(e)) from e
    return out
