"""A stateful in-memory stand-in for :class:`kproxy.kernel.ipset.Ipset`.

It owns a table of sets (type, family, canonical members) and answers the same
verbs with the same results and :class:`~kproxy.kernel.ipset.IpsetError` codes as
the kernel, held to it by ``tests/kernel/test_ipset_contract.py``:

* create of an existing name: fine with the same type and family, ``EEXIST`` otherwise;
* any verb on a missing set: ``ENOENT``;
* a malformed entry or one of the other family: ``EINVAL`` (checked before sending);
* delete of an entry that is not there: ``ERR_EXIST``;
* more than ``maxelem`` members: ``IPSET_ERR_HASH_FULL`` is not modelled (kproxy
  never gets near 65536 per set in tests).

It also counts the requests a real handle would send (``requests``; the batch
verbs also ``messages_sent``/``round_trips``, chunked as the real handle), so
callers can assert that a sync sends only the difference.  Like the real handle,
the first ``create_many`` of a handle costs one more round trip (one request per
supported type) for the kernel's type revisions, and ``list_all_entries`` is one
dump (one message, one round trip).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.kernel.handle import Handle
from kproxy.kernel.ipset import (
    ERR_EXIST,
    SET_TYPES,
    Family,
    IpsetBatchResult,
    IpsetError,
    SetInfo,
    SetType,
    canonical_entries,
    canonical_entry,
    create_specs,
)
from kproxy.kernel.netlink import CHUNK_MESSAGES

__all__ = ["FakeIpset", "FakeIpsetState"]


@dataclass
class FakeIpsetState:
    """The "kernel": sets by name.  Several handles may share one state."""

    info: dict[str, SetInfo] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)


class FakeIpset(Handle):
    """Same API as :class:`kproxy.kernel.ipset.Ipset`, backed by a :class:`FakeIpsetState`."""

    def __init__(self, state: FakeIpsetState | None = None) -> None:
        self.state = state if state is not None else FakeIpsetState()
        self.requests = 0  # netlink requests a real handle would have sent
        self.messages_sent = 0  # of the batch verbs
        self.round_trips = 0
        self._closed = False
        self._revisions_known = False  # the real handle asks once, on its first create_many

    def _request(self, verb: str, name: str | None, entry: str | None = None) -> None:
        if self._closed:
            raise IpsetError(verb, name, entry, errno.EBADF, "handle is closed")
        self.requests += 1

    def _info(self, verb: str, name: str, entry: str | None = None) -> SetInfo:
        info = self.state.info.get(name)
        if info is None:
            raise IpsetError(verb, name, entry, errno.ENOENT)
        return info

    def create(self, name: str, set_type: SetType, family: Family = "ipv4") -> None:
        if set_type not in SET_TYPES:
            raise IpsetError("create", name, None, errno.EINVAL, f"unsupported type {set_type}")
        self._request("create", name)
        info = SetInfo(set_type, None if set_type == "bitmap:port" else family)
        existing = self.state.info.get(name)
        if existing is not None:
            if existing != info:
                raise IpsetError("create", name, None, errno.EEXIST)
            return
        self.state.info[name] = info
        self.state.members[name] = set()

    def destroy(self, name: str) -> None:
        self._request("destroy", name)
        self._info("destroy", name)
        del self.state.info[name]
        del self.state.members[name]

    def list_sets(self) -> dict[str, SetInfo]:
        self._request("list-sets", None)
        return dict(self.state.info)

    def list_entries(self, name: str) -> set[str]:
        self._request("list", name)
        self._info("list", name)
        return set(self.state.members[name])

    def _canonical(self, verb: str, name: str, entry: str) -> str:
        info = self._info(verb, name, entry)
        try:
            return canonical_entry(info.type, entry, info.family)
        except ValueError as e:
            raise IpsetError(verb, name, entry, errno.EINVAL, str(e)) from e

    def add_entry(self, name: str, entry: str) -> None:
        if self._closed:
            raise IpsetError("add", name, entry, errno.EBADF, "handle is closed")
        text = self._canonical("add", name, entry)
        self._request("add", name, text)
        self.state.members[name].add(text)

    def delete_entry(self, name: str, entry: str) -> None:
        if self._closed:
            raise IpsetError("delete", name, entry, errno.EBADF, "handle is closed")
        text = self._canonical("delete", name, entry)
        self._request("delete", name, text)
        if text not in self.state.members[name]:
            raise IpsetError("delete", name, text, ERR_EXIST)
        self.state.members[name].discard(text)

    def sync_entries(self, name: str, desired: Iterable[str]) -> tuple[set[str], set[str]]:
        if self._closed:
            raise IpsetError("sync", name, None, errno.EBADF, "handle is closed")
        info = self._info("sync", name)
        want = canonical_entries("sync", name, info, desired)
        have = self.list_entries(name)
        added, removed = want - have, have - want
        for entry in sorted(removed):
            self.delete_entry(name, entry)
        for entry in sorted(added):
            self.add_entry(name, entry)
        return added, removed

    def _batch(self, verb: str, name: str, entries: Iterable[str]) -> list[str]:
        if self._closed:
            raise IpsetError(verb, name, None, errno.EBADF, "handle is closed")
        texts = list(dict.fromkeys(self._canonical(verb, name, e) for e in entries))
        self.requests += len(texts)
        self.messages_sent += len(texts)
        self.round_trips += -(-len(texts) // CHUNK_MESSAGES)
        return texts

    def add_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult:
        texts = self._batch("add", name, entries)
        self.state.members[name].update(texts)
        return IpsetBatchResult(frozenset(texts), (), len(texts), -(-len(texts) // CHUNK_MESSAGES))

    def delete_entries(self, name: str, entries: Iterable[str]) -> IpsetBatchResult:
        texts = self._batch("delete", name, entries)
        members = self.state.members[name]
        missing = [t for t in texts if t not in members]
        members.difference_update(texts)
        return IpsetBatchResult(
            frozenset(texts) - frozenset(missing),
            tuple(IpsetError("delete", name, t, ERR_EXIST) for t in missing),
            len(texts),
            -(-len(texts) // CHUNK_MESSAGES),
        )

    def create_many(self, specs: Iterable[tuple[str, SetType, Family]]) -> IpsetBatchResult:
        if self._closed:
            raise IpsetError("create", None, None, errno.EBADF, "handle is closed")
        infos = create_specs(specs)
        messages = round_trips = 0
        if infos and not self._revisions_known:
            self._revisions_known = True
            messages, round_trips = len(SET_TYPES), 1
        failures: list[IpsetError] = []
        for name, info in infos.items():
            existing = self.state.info.get(name)
            if existing is None:
                self.state.info[name] = info
                self.state.members[name] = set()
            elif existing != info:
                failures.append(IpsetError("create", name, None, errno.EEXIST))
        messages += len(infos)
        round_trips += -(-len(infos) // CHUNK_MESSAGES)
        self.requests += messages
        self.messages_sent += messages
        self.round_trips += round_trips
        failed = {f.name for f in failures}
        return IpsetBatchResult(frozenset(infos) - failed, tuple(failures), messages, round_trips)

    def list_all_entries(self) -> dict[str, set[str]]:
        self._request("list-all", None)
        self.messages_sent += 1
        self.round_trips += 1
        return {name: set(members) for name, members in self.state.members.items()}
