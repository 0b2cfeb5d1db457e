"""A stateful in-memory stand-in for :class:`kproxy.kernel.ipvs.Ipvs`.

It owns a table of virtual services and their destinations and answers the same
verbs with the same results and the same :class:`~kproxy.kernel.ipvs.IpvsError`
errnos as the kernel (held to it by ``tests/kernel/test_ipvs_contract.py``):

* add of an existing service or destination: ``EEXIST``;
* set/delete of a missing service, or any destination verb on one: ``ESRCH``;
* set/delete of a missing destination: ``ENOENT``;
* an unknown scheduler: ``ENOENT`` (the kernel fails to load the module);
* an IPv6 netmask outside 1..128, or a destination of the other address family
  without tunnelling: ``EINVAL``;
* listing the destinations of a missing service gives an empty list.

Listing order is insertion order; the kernel's is hash order, so callers must
not depend on either.  Several instances may share one table (``state``) to
model several sockets on one kernel.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

from kproxy.kernel.handle import Handle
from kproxy.kernel.ipvs import (
    ForwardingMethod,
    IPProtocol,
    IpvsError,
    RealServer,
    VirtualServer,
)

__all__ = ["KNOWN_SCHEDULERS", "FakeIpvs", "FakeIpvsState"]

# The schedulers Debian's linux-image-amd64 (6.1) ships as ip_vs_<name> modules.
KNOWN_SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh"}
)

_ServiceKey = tuple[IPv4Address | IPv6Address, int, IPProtocol]
_DestKey = tuple[IPv4Address | IPv6Address, int]


@dataclass
class FakeIpvsState:
    """The "kernel" table: services by key, each with its destinations by key."""

    services: dict[_ServiceKey, VirtualServer] = field(default_factory=dict)
    destinations: dict[_ServiceKey, dict[_DestKey, RealServer]] = field(default_factory=dict)


class FakeIpvs(Handle):
    """Same API as :class:`kproxy.kernel.ipvs.Ipvs`, backed by a :class:`FakeIpvsState`."""

    def __init__(self, state: FakeIpvsState | None = None) -> None:
        self.state = state if state is not None else FakeIpvsState()
        self._closed = False

    def _open(self, verb: str, vs: VirtualServer | None, rs: RealServer | None) -> None:
        if self._closed:
            raise IpvsError(verb, vs, rs, errno.EBADF, "handle is closed")

    def _validate_service(self, verb: str, vs: VirtualServer) -> None:
        if vs.address.version == 6 and not 1 <= vs.netmask <= 128:
            raise IpvsError(verb, vs, None, errno.EINVAL)
        if vs.scheduler not in KNOWN_SCHEDULERS:
            raise IpvsError(verb, vs, None, errno.ENOENT)

    def _service_dests(
        self, verb: str, vs: VirtualServer, rs: RealServer
    ) -> dict[_DestKey, RealServer]:
        self._open(verb, vs, rs)
        dests = self.state.destinations.get(vs.key)
        if dests is None:
            raise IpvsError(verb, vs, rs, errno.ESRCH)
        return dests

    # services

    def add_service(self, vs: VirtualServer) -> None:
        self._open("add-service", vs, None)
        if vs.key in self.state.services:
            raise IpvsError("add-service", vs, None, errno.EEXIST)
        self._validate_service("add-service", vs)
        self.state.services[vs.key] = vs
        self.state.destinations[vs.key] = {}

    def set_service(self, vs: VirtualServer) -> None:
        self._open("set-service", vs, None)
        if vs.key not in self.state.services:
            raise IpvsError("set-service", vs, None, errno.ESRCH)
        self._validate_service("set-service", vs)
        self.state.services[vs.key] = vs

    def delete_service(self, vs: VirtualServer) -> None:
        self._open("delete-service", vs, None)
        if vs.key not in self.state.services:
            raise IpvsError("delete-service", vs, None, errno.ESRCH)
        del self.state.services[vs.key]
        del self.state.destinations[vs.key]

    def list_services(self) -> list[VirtualServer]:
        self._open("list-services", None, None)
        return list(self.state.services.values())

    # destinations

    def add_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        dests = self._service_dests("add-destination", vs, rs)
        if rs.key in dests:
            raise IpvsError("add-destination", vs, rs, errno.EEXIST)
        mixed = rs.address.version != vs.address.version
        if mixed and rs.forwarding is not ForwardingMethod.TUNNEL:
            raise IpvsError("add-destination", vs, rs, errno.EINVAL)
        dests[rs.key] = self._stored(rs)

    def set_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        dests = self._service_dests("set-destination", vs, rs)
        if rs.key not in dests:
            raise IpvsError("set-destination", vs, rs, errno.ENOENT)
        dests[rs.key] = self._stored(rs)

    def delete_destination(self, vs: VirtualServer, rs: RealServer) -> None:
        dests = self._service_dests("delete-destination", vs, rs)
        if rs.key not in dests:
            raise IpvsError("delete-destination", vs, rs, errno.ENOENT)
        del dests[rs.key]

    def list_destinations(self, vs: VirtualServer) -> list[RealServer]:
        self._open("list-destinations", vs, None)
        return list(self.state.destinations.get(vs.key, {}).values())

    @staticmethod
    def _stored(rs: RealServer) -> RealServer:
        # No traffic flows through a fake: its counters are always zero.
        return replace(rs, active_connections=0, inactive_connections=0)
