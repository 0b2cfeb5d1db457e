"""The in-memory store (tests, throwaway clusters), and lease deadlines shared with sqlite.

Owns :class:`MemoryStore`: every key's version history (so reads at a past revision
work until compaction), a gap-free revision counter, leases, and a
:class:`~kproxy.store.watch.WatchHub` fed after each mutation. It runs entirely on
the event loop thread and never awaits inside a mutation, so each mutation is atomic
with respect to every other coroutine.

Also owns :class:`LeaseDeadlines`, the monotonic-clock TTL bookkeeping that the
sqlite backend reuses: which leases exist, when each expires, and a wait that wakes
the reaper at the next deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from kproxy.store.base import (
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    EventType,
    FutureRevision,
    KeyValue,
    LeaseNotFound,
    NotFound,
    Store,
    StoreClosed,
    WatchItem,
    prefix_end,
)
from kproxy.store.watch import DEFAULT_WINDOW, WatchHub


class LeaseDeadlines:
    """Lease id -> (ttl, deadline) on the monotonic clock; wakes a reaper when due."""

    def __init__(self) -> None:
        self._leases: dict[int, tuple[int, float]] = {}
        self._changed = asyncio.Event()

    def __contains__(self, lease: int) -> bool:
        return lease in self._leases

    def grant(self, lease: int, ttl: int) -> None:
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        self._changed.set()

    def keepalive(self, lease: int) -> int:
        if lease not in self._leases:
            raise LeaseNotFound(lease)
        ttl, _ = self._leases[lease]
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        return ttl

    def remove(self, lease: int) -> None:
        if self._leases.pop(lease, None) is None:
            raise LeaseNotFound(lease)

    async def wait_due(self) -> list[int]:
        """Sleep until some leases are due, then return them (still registered)."""
        while True:
            now = time.monotonic()
            due = [lease for lease, (_, deadline) in self._leases.items() if deadline <= now]
            if due:
                return due
            nxt = min((d for _, d in self._leases.values()), default=math.inf)
            self._changed.clear()
            timeout = None if nxt == math.inf else nxt - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)


async def reap_leases(deadlines: LeaseDeadlines, revoke: Callable[[int], Awaitable[None]]) -> None:
    """The reaper task body: revoke each lease when it falls due, forever."""
    while True:
        for lease in await deadlines.wait_due():
            with contextlib.suppress(LeaseNotFound):  # revoked meanwhile by a caller
                await revoke(lease)


class MemoryStore(Store):
    """A complete in-process store. Nothing survives ``close``."""

    def __init__(self, *, watch_window: int = DEFAULT_WINDOW) -> None:
        self._revision = 0
        self._compact_revision = 0
        # key -> [(revision, state or None once deleted)], revisions ascending.
        self._versions: dict[str, list[tuple[int, KeyValue | None]]] = {}
        self._keys: list[str] = []  # sorted keys of _versions, for prefix ranges
        self._hub = WatchHub(head=0, window=watch_window)
        self._deadlines = LeaseDeadlines()
        self._lease_keys: dict[int, set[str]] = {}
        self._lease_ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ reads

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("memory store is closed")

    def _at(self, key: str, revision: int) -> KeyValue | None:
        versions = self._versions.get(key)
        if not versions:
            return None
        i = bisect.bisect_right(versions, revision, key=lambda v: v[0])
        return versions[i - 1][1] if i else None

    def _read_revision(self, revision: int | None) -> int:
        if revision is None or revision == 0:
            return self._revision
        if revision < self._compact_revision:
            raise Compacted(revision, self._compact_revision)
        if revision > self._revision:
            raise FutureRevision(revision, self._revision)
        return revision

    async def get(self, key: str, *, revision: int | None = None) -> KeyValue:
        self._check_open()
        kv = self._at(key, self._read_revision(revision))
        if kv is None:
            raise NotFound(key)
        return kv

    async def list(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int | None = None,
        start_after: str | None = None,
    ) -> tuple[list[KeyValue], int]:
        self._check_open()
        rev = self._read_revision(revision)
        end = prefix_end(prefix)
        if start_after is not None and start_after >= prefix:
            i = bisect.bisect_right(self._keys, start_after)
        else:
            i = bisect.bisect_left(self._keys, prefix)
        items: list[KeyValue] = []
        while i < len(self._keys) and (end is None or self._keys[i] < end):
            if limit is not None and len(items) >= limit:
                break
            kv = self._at(self._keys[i], rev)
            if kv is not None:
                items.append(kv)
            i += 1
        return items, rev

    async def current_revision(self) -> int:
        self._check_open()
        return self._revision

    # ------------------------------------------------------------------ writes

    def _latest(self, key: str) -> KeyValue | None:
        versions = self._versions.get(key)
        return versions[-1][1] if versions else None

    def _commit(self, key: str, kv: KeyValue | None, prev: KeyValue | None) -> KeyValue:
        """Record the new state of ``key`` at the next revision and publish the event."""
        self._revision += 1
        rev = self._revision
        if key not in self._versions:
            bisect.insort(self._keys, key)
            self._versions[key] = []
        self._versions[key].append((rev, kv))
        if prev is not None and prev.lease:
            self._lease_keys.get(prev.lease, set()).discard(key)
        if kv is not None:
            if kv.lease:
                self._lease_keys[kv.lease].add(key)
            event = Event(EventType.PUT, kv, prev)
        else:
            event = Event(EventType.DELETE, KeyValue(key, b"", 0, rev, 0, 0), prev)
        self._hub.publish(event)
        return event.kv

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self._deadlines:
            raise LeaseNotFound(lease)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue:
        self._check_open()
        cur = self._latest(key)
        if cur is not None:
            raise AlreadyExists(key, cur)
        self._check_lease(lease)
        rev = self._revision + 1
        return self._commit(key, KeyValue(key, bytes(value), rev, rev, 1, lease), None)

    async def update(
        self, key: str, value: bytes, expected_mod_revision: int, *, lease: int = 0
    ) -> KeyValue:
        self._check_open()
        cur = self._latest(key)
        if cur is None:
            raise NotFound(key)
        if cur.mod_revision != expected_mod_revision:
            raise Conflict(key, expected_mod_revision, cur)
        self._check_lease(lease)
        kv = KeyValue(
            key, bytes(value), cur.create_revision, self._revision + 1, cur.version + 1, lease
        )
        return self._commit(key, kv, cur)

    async def delete(self, key: str, expected_mod_revision: int | None = None) -> KeyValue:
        self._check_open()
        cur = self._latest(key)
        if cur is None:
            raise NotFound(key)
        if expected_mod_revision is not None and cur.mod_revision != expected_mod_revision:
            raise Conflict(key, expected_mod_revision, cur)
        self._commit(key, None, cur)
        return cur

    # ------------------------------------------------------------------ watch, compaction

    def watch(
        self, prefix: str, start_revision: int = 0, *, progress_interval: float | None = None
    ) -> AsyncIterator[WatchItem]:
        self._check_open()
        return self._hub.watch(prefix, start_revision, progress_interval)

    async def compact(self, revision: int) -> None:
        self._check_open()
        if revision > self._revision:
            raise FutureRevision(revision, self._revision)
        if revision <= self._compact_revision:
            return
        self._compact_revision = revision
        self._hub.compact(revision)
        for key in list(self._versions):
            versions = self._versions[key]
            i = bisect.bisect_right(versions, revision, key=lambda v: v[0])
            # Keep the state as of `revision` (reads there must still work) unless deleted.
            keep_from = i - 1 if i and versions[i - 1][1] is not None else i
            del versions[:keep_from]
            if not versions:
                del self._versions[key]
                self._keys.pop(bisect.bisect_left(self._keys, key))

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl: int) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease = next(self._lease_ids)
        self._deadlines.grant(lease, ttl)
        self._lease_keys[lease] = set()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(
                reap_leases(self._deadlines, self.revoke_lease), name="kproxy-memory-leases"
            )
        return lease

    async def keepalive(self, lease: int) -> int:
        self._check_open()
        return self._deadlines.keepalive(lease)

    async def revoke_lease(self, lease: int) -> None:
        self._check_open()
        self._deadlines.remove(lease)
        for key in sorted(self._lease_keys.pop(lease, set())):
            cur = self._latest(key)
            if cur is not None:
                self._commit(key, None, cur)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
