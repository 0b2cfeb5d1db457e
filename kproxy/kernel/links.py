"""The dummy link ``kube-ipvs0`` and local addresses, over rtnetlink (pyroute2's ``IPRoute``).

This module owns the link IPVS mode binds its virtual IPs to, the addresses on it,
and the one read of every other local address that NodePort services need.

Invariants (upstream ``pkg/proxy/ipvs``, reference §1.5):

- :meth:`Links.ensure_link` creates a ``dummy`` link named ``kube-ipvs0`` if it is
  missing and never sets it up: its host addresses still get ``local`` routes
  (table 255), which is all IPVS needs, and a down link answers no ARP.
- Addresses on it are host addresses: /32 for IPv4, /128 for IPv6.  Binding an
  address that is already bound and unbinding one that is not are no-ops that
  report ``False`` (upstream tolerates EEXIST and ENXIO the same way).
- :meth:`Links.local_addresses` is one ``RTM_GETADDR`` dump of a family, minus the
  addresses of ``kube-ipvs0``, loopback addresses and IPv6 link-local ones
  (upstream ``GetAllLocalAddressesExcept`` + ``isValidForSet``).
- One rtnetlink socket per :class:`Links`, opened in the constructor and kept
  until :meth:`Links.close`, used only from the thread that opened it.  With
  ``netns`` (tests) the socket is created inside that existing namespace (never
  created here); the proxy passes ``None`` and runs inside the node's namespace.
"""

from __future__ import annotations

import errno as errno_mod
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Literal, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle
from kproxy.kernel.netlink import AckedSender, BatchOutcome

__all__ = ["DUMMY_LINK", "Family", "Links", "LinksBatchResult", "LinksError", "LinksVerbs"]

DUMMY_LINK: Final = "kube-ipvs0"
Family = Literal["ipv4", "ipv6"]
IPAddress = IPv4Address | IPv6Address

_AF: Final[dict[Family, int]] = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def host_prefixlen(address: IPAddress) -> int:
    return 32 if address.version == 4 else 128


def valid_local(address: IPAddress) -> bool:
    """Whether a local address counts as a node address (not loopback, not v6 link-local)."""
    if address.is_loopback:
        return False
    return not (address.version == 6 and address.is_link_local)


class LinksError(KProxyError):
    """A link or address verb failed; keeps the verb, the link, the address and the errno."""

    def __init__(
        self,
        verb: str,
        link: str,
        address: IPAddress | None,
        errno: int,
        reason: str = "",
        netns: str | None = None,
    ) -> None:
        self.verb = verb
        self.link = link
        self.address = address
        self.errno = errno
        self.reason = reason or (errno_mod.errorcode.get(errno, "") if errno else "")
        self.netns = netns
        where = f" in netns {netns}" if netns else ""
        what = f" {address}" if address is not None else ""
        super().__init__(f"link {verb} {link}{what}{where}: {self.reason} (errno {errno})")


class LinksVerbs(Protocol):
    """What the IPVS proxy mode needs of links; :class:`Links` and the fake implement it."""

    @property
    def name(self) -> str: ...
    def ensure_link(self) -> bool: ...
    def link_exists(self) -> bool: ...
    def delete_link(self) -> bool: ...
    def list_addresses(self, family: Family) -> set[IPAddress]: ...
    def add_address(self, address: IPAddress) -> bool: ...
    def delete_address(self, address: IPAddress) -> bool: ...
    def local_addresses(self, family: Family) -> set[IPAddress]: ...
    def add_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult: ...
    def delete_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LinksBatchResult(BatchOutcome):
    """What one batch address verb did: the addresses it changed (bound / unbound;
    already bound / not bound ones are neither changed nor failed), one
    :class:`LinksError` per refused address, and the netlink traffic."""

    changed: frozenset[IPAddress]
    failures: tuple[LinksError, ...] = ()
    messages: int = 0
    round_trips: int = 0


# Hand-encoded RTM_NEWADDR/RTM_DELADDR for the batch verbs (uapi if_addr.h).
_RTM_NEWADDR: Final = 20
_RTM_DELADDR: Final = 21
_NLM_F_REQUEST_ACK: Final = 0x1 | 0x4
_NLM_F_CREATE_EXCL: Final = 0x400 | 0x200
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_HDR: Final = struct.Struct("=IHHII")
_IFADDR: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_NLA: Final = struct.Struct("=HH")
_UNBOUND: Final = (errno_mod.EADDRNOTAVAIL, errno_mod.ENXIO, errno_mod.ENOENT)


def encode_address(cmd: int, index: int, address: IPAddress, seq: int) -> bytes:
    """One RTM_NEWADDR (create, exclusive) or RTM_DELADDR of a host address, acked."""
    raw = address.packed
    nla = _NLA.pack(4 + len(raw), _IFA_LOCAL) + raw + _NLA.pack(4 + len(raw), _IFA_ADDRESS) + raw
    af = socket.AF_INET if address.version == 4 else socket.AF_INET6
    body = _IFADDR.pack(af, host_prefixlen(address), 0, 0, index) + nla
    flags = _NLM_F_REQUEST_ACK | (_NLM_F_CREATE_EXCL if cmd == _RTM_NEWADDR else 0)
    return _HDR.pack(_HDR.size + len(body), cmd, flags, seq, 0) + body


def _sender_in(netns: str | None) -> AckedSender:
    """A NETLINK_ROUTE sender in ``netns`` (None: ours).  The socket is made by a
    short-lived thread that enters the namespace: only that thread moves, and a
    socket keeps the namespace it was created in."""
    if netns is None:
        return AckedSender(socket.NETLINK_ROUTE)
    out: list[AckedSender | BaseException] = []

    def make() -> None:
        try:
            from pyroute2.netns import setns

            setns(netns, flags=0)  # never create: the namespace must exist
            out.append(AckedSender(socket.NETLINK_ROUTE))
        except BaseException as e:  # re-raised in the caller
            out.append(e)

    t = threading.Thread(target=make, name="links-netns-socket")
    t.start()
    t.join(timeout=30)
    if not out:
        raise TimeoutError("could not open a socket in the namespace")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class Links(SocketHandle):
    """One rtnetlink socket and the verbs on ``kube-ipvs0`` over it."""

    def __init__(self, name: str = DUMMY_LINK, netns: str | None = None) -> None:
        self._name = name
        self.netns = netns
        self._closed = False
        self._thread = threading.get_ident()
        self._index: int | None = None
        try:
            self._sock: Any = IPRoute(netns=netns, flags=0) if netns else IPRoute()
        except OSError as e:  # FileNotFoundError: no such netns
            raise LinksError("open", name, None, e.errno or 0, str(e), netns) from e
        except (TimeoutError, RuntimeError) as e:  # the netns helper child failed
            raise LinksError("open", name, None, errno_mod.EIO, str(e), netns) from e
        try:
            self._batch = _sender_in(netns)
        except (OSError, RuntimeError) as e:
            self._sock.close()
            code = e.errno if isinstance(e, OSError) and e.errno else errno_mod.EIO
            raise LinksError("open", name, None, code, str(e), netns) from e

    def close(self) -> None:
        if not self._closed:
            self._batch.close()
        super().close()

    @property
    def messages_sent(self) -> int:
        """Requests sent by the batch verbs over the handle's life."""
        return self._batch.messages_sent

    @property
    def round_trips(self) -> int:
        return self._batch.round_trips

    @property
    def name(self) -> str:
        return self._name

    def _call(self, verb: str, subject: IPAddress | None, fn: Any, *a: Any, **kw: Any) -> Any:
        if self._closed:
            raise LinksError(verb, self._name, subject, errno_mod.EBADF, "closed", self.netns)
        if threading.get_ident() != self._thread:
            raise LinksError(
                verb, self._name, subject, errno_mod.EBADF, "used from another thread", self.netns
            )
        try:
            out = fn(*a, **kw)
            return list(out) if out is not None and not isinstance(out, (list, tuple)) else out
        except NetlinkError as e:
            raise LinksError(verb, self._name, subject, e.code, "", self.netns) from e
        except OSError as e:
            raise LinksError(verb, self._name, subject, e.errno or 0, str(e), self.netns) from e

    def _lookup(self, verb: str) -> int | None:
        found = self._call(verb, None, self._sock.link_lookup, ifname=self._name)
        self._index = int(found[0]) if found else None
        return self._index

    def _require(self, verb: str, address: IPAddress | None) -> int:
        # The index is cached: it only changes if someone deletes and re-creates the
        # link behind our back, and then the kernel answers ENODEV and we look again.
        index = self._index if self._index is not None else self._lookup(verb)
        if index is None:
            raise LinksError(verb, self._name, address, errno_mod.ENODEV, "", self.netns)
        return index

    def link_exists(self) -> bool:
        return self._lookup("lookup") is not None

    def ensure_link(self) -> bool:
        """Create the dummy link if missing (left down); True if it was created."""
        if self._lookup("ensure") is not None:
            return False
        try:
            self._call("ensure", None, self._sock.link, "add", ifname=self._name, kind="dummy")
        except LinksError as e:
            if e.errno != errno_mod.EEXIST:  # created meanwhile by someone else: fine
                raise
        self._lookup("ensure")
        return True

    def delete_link(self) -> bool:
        """Delete the link and with it its addresses; False if it did not exist."""
        index = self._lookup("delete-link")
        if index is None:
            return False
        self._call("delete-link", None, self._sock.link, "del", index=index)
        self._index = None
        return True

    def _retry_on_enodev(self, verb: str, subject: IPAddress | None, fn: Any, **kw: Any) -> Any:
        index = self._require(verb, subject)
        try:
            return self._call(verb, subject, fn, index=index, **kw)
        except LinksError as e:
            if e.errno != errno_mod.ENODEV:
                raise
        self._index = None
        return self._call(verb, subject, fn, index=self._require(verb, subject), **kw)

    def list_addresses(self, family: Family) -> set[IPAddress]:
        """The addresses bound to the link, of ``family``."""
        msgs = self._retry_on_enodev(
            "list-addresses", None, self._sock.get_addr, family=_AF[family]
        )
        return {ip_address(m.get_attr("IFA_ADDRESS")) for m in msgs}

    def add_address(self, address: IPAddress) -> bool:
        """Bind ``address`` (host prefix) to the link; False if it was already bound."""
        try:
            self._retry_on_enodev(
                "add-address", address, self._sock.addr, command="add",
                address=str(address), prefixlen=host_prefixlen(address),
            )  # fmt: skip
        except LinksError as e:
            if e.errno == errno_mod.EEXIST:
                return False
            raise
        return True

    def delete_address(self, address: IPAddress) -> bool:
        """Unbind ``address`` from the link; False if it was not bound."""
        try:
            self._retry_on_enodev(
                "delete-address", address, self._sock.addr, command="del",
                address=str(address), prefixlen=host_prefixlen(address),
            )  # fmt: skip
        except LinksError as e:
            if e.errno in (errno_mod.EADDRNOTAVAIL, errno_mod.ENXIO, errno_mod.ENOENT):
                return False
            raise
        return True

    def local_addresses(self, family: Family) -> set[IPAddress]:
        """Every node address of ``family`` except the link's: one ``RTM_GETADDR`` dump."""
        index = self._index if self._index is not None else self._lookup("local-addresses")
        msgs = self._call("local-addresses", None, self._sock.get_addr, family=_AF[family])
        out: set[IPAddress] = set()
        for m in msgs:
            if m["index"] == index:
                continue
            # IFA_LOCAL is the interface's own address on point-to-point links, where
            # IFA_ADDRESS is the peer's; elsewhere they are equal.
            raw = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if raw is None:
                continue
            addr = ip_address(raw)
            if valid_local(addr):
                out.add(addr)
        return out

    # -- batch verbs ---------------------------------------------------------------
    def add_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult:
        """Bind every address, many requests per round trip; bound ones are no-ops."""
        return self._batch_addr("add-address", _RTM_NEWADDR, addresses, (errno_mod.EEXIST,))

    def delete_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult:
        """Unbind every address, many requests per round trip; unbound ones are no-ops."""
        return self._batch_addr("delete-address", _RTM_DELADDR, addresses, _UNBOUND)

    def _batch_addr(
        self, verb: str, cmd: int, addresses: Iterable[IPAddress], noop: tuple[int, ...]
    ) -> LinksBatchResult:
        todo = list(dict.fromkeys(addresses))
        self._call(verb, None, lambda: None)  # closed / wrong-thread checks
        sent0, trips0 = self._batch.messages_sent, self._batch.round_trips
        failed = self._send_addr(verb, cmd, todo, self._require(verb, None))
        if any(code == errno_mod.ENODEV for code in failed.values()):
            # The link was re-created behind our back: look it up once and retry those.
            self._index = None
            again = [a for a, code in failed.items() if code == errno_mod.ENODEV]
            for a in again:
                del failed[a]
            failed.update(self._send_addr(verb, cmd, again, self._require(verb, None)))
        failures = tuple(
            LinksError(verb, self._name, a, code, "", self.netns)
            for a, code in failed.items()
            if code not in noop
        )
        return LinksBatchResult(
            changed=frozenset(a for a in todo if a not in failed),
            failures=failures,
            messages=self._batch.messages_sent - sent0,
            round_trips=self._batch.round_trips - trips0,
        )

    def _send_addr(
        self, verb: str, cmd: int, todo: list[IPAddress], index: int
    ) -> dict[IPAddress, int]:
        by_seq: dict[int, IPAddress] = {}
        requests: list[tuple[int, bytes]] = []
        for addr in todo:
            seq = self._batch.next_seq()
            by_seq[seq] = addr
            requests.append((seq, encode_address(cmd, index, addr, seq)))
        try:
            failed = self._batch.send(requests)
        except OSError as e:
            raise LinksError(verb, self._name, None, e.errno or 0, str(e), self.netns) from e
        return {by_seq[s]: code for s, code in failed.items()}
