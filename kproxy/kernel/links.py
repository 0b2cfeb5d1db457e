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
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Literal, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError
from kproxy.kernel.handle import SocketHandle

__all__ = ["DUMMY_LINK", "Family", "Links", "LinksError", "LinksVerbs"]

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
    def close(self) -> None: ...


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
