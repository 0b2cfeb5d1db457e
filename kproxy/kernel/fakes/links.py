"""A stateful in-memory stand-in for :class:`kproxy.kernel.links.Links`.

It owns whether the dummy link exists, the addresses bound to it and the node's
other addresses (``node_addresses``, set by tests as the interfaces a node would
have), and answers the verbs as the kernel does (held to it by
``tests/kernel/test_links_contract.py``):

* address verbs and listing on a missing link: ``ENODEV``;
* binding a bound address or unbinding an unbound one: ``False``, not an error;
* deleting the link takes its addresses with it;
* :meth:`FakeLinks.local_addresses` leaves out the link's addresses, loopback and
  IPv6 link-local ones, like the real dump.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.kernel.handle import Handle
from kproxy.kernel.links import (
    DUMMY_LINK,
    Family,
    IPAddress,
    LinksBatchResult,
    LinksError,
    valid_local,
)
from kproxy.kernel.netlink import CHUNK_MESSAGES

__all__ = ["FakeLinks", "FakeLinksState"]


@dataclass
class FakeLinksState:
    """The "kernel": the link's existence and addresses, and the node's other addresses."""

    exists: bool = False
    addresses: set[IPAddress] = field(default_factory=set)
    node_addresses: set[IPAddress] = field(default_factory=set)
    created: int = 0  # how many times the link was created


def _version(family: Family) -> int:
    return 4 if family == "ipv4" else 6


class FakeLinks(Handle):
    """Same API as :class:`kproxy.kernel.links.Links`, backed by a :class:`FakeLinksState`."""

    def __init__(self, name: str = DUMMY_LINK, state: FakeLinksState | None = None) -> None:
        self._name = name
        self.state = state if state is not None else FakeLinksState()
        self._closed = False
        self.messages_sent = 0  # of the batch verbs, chunked as the real handle
        self.round_trips = 0

    @property
    def name(self) -> str:
        return self._name

    def _check(self, verb: str, address: IPAddress | None = None, *, link: bool = False) -> None:
        if self._closed:
            raise LinksError(verb, self._name, address, errno.EBADF, "closed")
        if link and not self.state.exists:
            raise LinksError(verb, self._name, address, errno.ENODEV)

    def link_exists(self) -> bool:
        self._check("lookup")
        return self.state.exists

    def ensure_link(self) -> bool:
        self._check("ensure")
        if self.state.exists:
            return False
        self.state.exists = True
        self.state.created += 1
        return True

    def delete_link(self) -> bool:
        self._check("delete-link")
        if not self.state.exists:
            return False
        self.state.exists = False
        self.state.addresses.clear()
        return True

    def list_addresses(self, family: Family) -> set[IPAddress]:
        self._check("list-addresses", link=True)
        return {a for a in self.state.addresses if a.version == _version(family)}

    def add_address(self, address: IPAddress) -> bool:
        self._check("add-address", address, link=True)
        if address in self.state.addresses:
            return False
        self.state.addresses.add(address)
        return True

    def delete_address(self, address: IPAddress) -> bool:
        self._check("delete-address", address, link=True)
        if address not in self.state.addresses:
            return False
        self.state.addresses.discard(address)
        return True

    def local_addresses(self, family: Family) -> set[IPAddress]:
        self._check("local-addresses")
        return {
            a for a in self.state.node_addresses if a.version == _version(family) and valid_local(a)
        }

    def _batch(self, verb: str, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        self._check(verb, None, link=True)
        todo = list(dict.fromkeys(addresses))
        self.messages_sent += len(todo)
        self.round_trips += -(-len(todo) // CHUNK_MESSAGES)
        return todo

    def add_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult:
        todo = self._batch("add-address", addresses)
        changed = frozenset(a for a in todo if a not in self.state.addresses)
        self.state.addresses |= changed
        return LinksBatchResult(changed, (), len(todo), -(-len(todo) // CHUNK_MESSAGES))

    def delete_addresses(self, addresses: Iterable[IPAddress]) -> LinksBatchResult:
        todo = self._batch("delete-address", addresses)
        changed = frozenset(a for a in todo if a in self.state.addresses)
        self.state.addresses -= changed
        return LinksBatchResult(changed, (), len(todo), -(-len(todo) // CHUNK_MESSAGES))
