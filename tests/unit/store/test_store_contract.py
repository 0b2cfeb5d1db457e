"""The store contract, run against every backend: memory, sqlite and a real etcd.

Each test opens a fresh store (etcd: one member shared by the session, so each test
works under its own random key prefix and never assumes it owns the revision
counter), runs an async body under a deadline with plain ``asyncio.run``, and closes
the store. Watches are drained by a background task into a queue (:class:`Recorder`),
because cancelling a pending ``anext()`` on an async generator would end the watch.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kproxy.store import (
    AlreadyExists,
    Bookmark,
    Compacted,
    Conflict,
    Event,
    EventType,
    FutureRevision,
    LeaseNotFound,
    MemoryStore,
    NotFound,
    SqliteStore,
    Store,
    StoreError,
    WatchItem,
)
from tests.support.tiers import require, require_commands
from tests.unit.store.etcd_fixture import (  # noqa: F401 (etcd_one is a fixture)
    EtcdCluster,
    etcd_cluster,
    etcd_one,
)

Body = Callable[[Store, str], Awaitable[None]]


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[Store]]
    embedded: bool  # gap-free revisions and an in-process watch window

    def run(self, body: Body, timeout: float = 30.0) -> None:
        prefix = f"/kp-test/{uuid.uuid4().hex[:10]}/"

        async def main() -> None:
            store = await self.open()
            try:
                await asyncio.wait_for(body(store, prefix), timeout)
            finally:
                await store.close()

        asyncio.run(main())


async def _memory() -> Store:
    return MemoryStore()


@pytest.fixture(params=["memory", "sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "memory":
        return Backend(name, _memory, embedded=True)
    if name == "sqlite":
        return Backend(name, lambda: SqliteStore.open(tmp_path / "store.db"), embedded=True)
    cluster: EtcdCluster = request.getfixturevalue("etcd_one")
    try:
        from kproxy.store.etcd import EtcdStore
    except ImportError as exc:  # aetcd missing
        require(False, f"etcd backend unavailable: {exc}")
        raise
    return Backend(name, lambda: EtcdStore.connect(cluster.endpoints), embedded=False)


class Recorder:
    """Drains a watch in the background; the test reads items with timeouts."""

    def __init__(self, watch: AsyncIterator[WatchItem]) -> None:
        self._queue: asyncio.Queue[WatchItem | StoreError] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump(watch))

    async def _pump(self, watch: AsyncIterator[WatchItem]) -> None:
        try:
            async for item in watch:
                self._queue.put_nowait(item)
        except StoreError as exc:
            self._queue.put_nowait(exc)

    async def item(self, timeout: float = 10.0) -> WatchItem | StoreError:
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def events(self, n: int, timeout: float = 10.0) -> list[Event]:
        """The next ``n`` events (bookmarks skipped)."""
        out: list[Event] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < n:
            item = await self.item(max(0.0, deadline - loop.time()))
            if isinstance(item, StoreError):
                raise item
            if isinstance(item, Event):
                out.append(item)
        return out

    async def bookmark(self, timeout: float = 10.0) -> Bookmark:
        while True:
            item = await self.item(timeout)
            if isinstance(item, Bookmark):
                return item
            if isinstance(item, StoreError):
                raise item

    async def error(self, timeout: float = 10.0) -> StoreError:
        item = await self.item(timeout)
        assert isinstance(item, StoreError), f"expected an error, got {item}"
        return item

    async def quiet(self, seconds: float) -> list[Event]:
        """Events that arrive within ``seconds`` (expected: none)."""
        await asyncio.sleep(seconds)
        out = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Event):
                out.append(item)
        return out

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --------------------------------------------------------------------------- CRUD and CAS


def test_create_is_create_if_absent(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        kv = await store.create(p + "a", b"1")
        assert (kv.key, kv.value, kv.version, kv.lease) == (p + "a", b"1", 1, 0)
        assert kv.create_revision == kv.mod_revision > 0
        assert await store.get(p + "a") == kv
        with pytest.raises(AlreadyExists) as exc:
            await store.create(p + "a", b"2")
        assert exc.value.current == kv
        assert (await store.get(p + "a")).value == b"1"
        with pytest.raises(NotFound):
            await store.get(p + "missing")

    backend.run(body)


def test_update_is_guarded_by_mod_revision(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        kv1 = await store.create(p + "a", b"1")
        kv2 = await store.update(p + "a", b"2", kv1.mod_revision)
        assert kv2.mod_revision > kv1.mod_revision
        assert (kv2.create_revision, kv2.version, kv2.value) == (kv1.create_revision, 2, b"2")
        with pytest.raises(Conflict) as exc:
            await store.update(p + "a", b"3", kv1.mod_revision)
        assert exc.value.current == kv2
        assert await store.get(p + "a") == kv2
        with pytest.raises(NotFound):
            await store.update(p + "missing", b"x", kv2.mod_revision)

    backend.run(body)


def test_delete_is_guarded_by_mod_revision(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        kv = await store.create(p + "a", b"1")
        with pytest.raises(Conflict) as exc:
            await store.delete(p + "a", kv.mod_revision + 1000)
        assert exc.value.current == kv
        assert await store.delete(p + "a", kv.mod_revision) == kv
        with pytest.raises(NotFound):
            await store.get(p + "a")
        with pytest.raises(NotFound):
            await store.delete(p + "a")
        again = await store.create(p + "a", b"2")
        assert again.version == 1 and again.create_revision > kv.mod_revision
        assert await store.delete(p + "a") == again  # unconditional

    backend.run(body)


def test_revisions_are_monotonic(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        start = await store.current_revision()
        revs = []
        for i in range(10):
            revs.append((await store.create(f"{p}k{i}", b"v")).mod_revision)
        for i in range(0, 10, 2):
            kv = await store.get(f"{p}k{i}")
            revs.append((await store.update(kv.key, b"w", kv.mod_revision)).mod_revision)
        for i in range(0, 10, 3):
            await store.delete(f"{p}k{i}")
            revs.append(await store.current_revision())
        assert all(b > a for a, b in itertools.pairwise([start, *revs]))
        assert await store.current_revision() == revs[-1]
        if backend.embedded:  # one revision per mutation, no gaps
            assert revs == list(range(start + 1, start + 1 + len(revs)))

    backend.run(body)


# --------------------------------------------------------------------------- list


def test_list_returns_a_snapshot_and_its_revision(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        for i in range(10):
            await store.create(f"{p}k{i:02}", f"v{i}".encode())
        await store.create(p[:-1] + "0", b"sibling, not under the prefix")
        items, rev = await store.list(p)
        assert [kv.key for kv in items] == [f"{p}k{i:02}" for i in range(10)]
        assert rev == await store.current_revision()
        assert all(kv.mod_revision <= rev for kv in items)

        k0 = items[0]
        await store.update(k0.key, b"changed", k0.mod_revision)
        await store.delete(items[1].key)
        await store.create(f"{p}k10", b"new")

        old, old_rev = await store.list(p, revision=rev)
        assert (old, old_rev) == (items, rev)
        assert await store.get(k0.key, revision=rev) == k0
        new, new_rev = await store.list(p)
        assert new_rev > rev
        assert [kv.key for kv in new] == [items[0].key, *[kv.key for kv in items[2:]], f"{p}k10"]
        assert new[0].value == b"changed"

        # Pages pinned to the first page's revision form one snapshot, despite writes.
        page, page_rev = await store.list(p, limit=4)
        seen = list(page)
        while len(page) == 4:
            await store.create(f"{p}k{len(seen) + 100}", b"written between pages")
            page, r = await store.list(p, revision=page_rev, limit=4, start_after=seen[-1].key)
            assert r == page_rev
            seen.extend(page)
        assert seen == new
        with pytest.raises(FutureRevision):
            await store.list(p, revision=await store.current_revision() + 1000)

    backend.run(body)


# --------------------------------------------------------------------------- watch


def test_watch_delivers_each_later_event_once_in_order_with_prev(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        await store.create(p + "before", b"not delivered: older than the start")
        start = await store.current_revision() + 1
        w = Recorder(store.watch(p, start))
        a1 = await store.create(p + "a", b"1")
        a2 = await store.update(p + "a", b"2", a1.mod_revision)
        b1 = await store.create(p + "b", b"1")
        await store.create(p[:-1] + "0", b"sibling: not delivered")
        deleted = await store.delete(p + "a")
        del_rev = await store.current_revision()
        b2 = await store.update(p + "b", b"2", b1.mod_revision)
        events = await w.events(5)
        assert [(e.type, e.kv.key, e.kv.value, e.prev_kv) for e in events] == [
            (EventType.PUT, p + "a", b"1", None),
            (EventType.PUT, p + "a", b"2", a1),
            (EventType.PUT, p + "b", b"1", None),
            (EventType.DELETE, p + "a", b"", a2),
            (EventType.PUT, p + "b", b"2", b1),
        ]
        assert deleted == a2
        assert [e.revision for e in events] == [
            a1.mod_revision,
            a2.mod_revision,
            b1.mod_revision,
            del_rev,
            b2.mod_revision,
        ]
        assert [e.kv for e in events if e.type is EventType.PUT] == [a1, a2, b1, b2]
        assert await w.quiet(0.3) == []
        await w.close()
        # The same history replays for a watch started later from the same revision.
        replay = Recorder(store.watch(p, start))
        assert await replay.events(5) == events
        await replay.close()

    backend.run(body)


def test_resumed_watch_misses_nothing_and_duplicates_nothing(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        start = await store.current_revision() + 1
        written: list[int] = []

        async def writer() -> None:
            for i in range(60):
                written.append((await store.create(f"{p}k{i:03}", b"v")).mod_revision)
                if i % 5 == 0:
                    await asyncio.sleep(0.01)

        task = asyncio.create_task(writer())
        first = Recorder(store.watch(p, start))
        got = await first.events(20)
        await first.close()  # the "connection" drops mid-stream, writes go on
        second = Recorder(store.watch(p, got[-1].revision + 1))
        got += await second.events(40)
        await task
        assert [e.revision for e in got] == written
        assert [e.kv.key for e in got] == [f"{p}k{i:03}" for i in range(60)]
        assert await second.quiet(0.2) == []
        await second.close()

    backend.run(body)


def test_concurrent_writers_with_a_watcher_exactly_once(backend: Backend) -> None:
    keys, workers, rounds = 4, 6, 10

    async def body(store: Store, p: str) -> None:
        start = await store.current_revision() + 1
        w = Recorder(store.watch(p, start))
        for k in range(keys):
            await store.create(f"{p}c{k}", b"0")

        async def worker(n: int) -> int:
            conflicts = 0
            for r in range(rounds):
                key = f"{p}c{(n + r) % keys}"
                kv = await store.get(key)
                for _ in range(1000):
                    try:
                        await store.update(key, str(int(kv.value) + 1).encode(), kv.mod_revision)
                        break
                    except Conflict as exc:
                        conflicts += 1
                        kv = exc.current
                else:
                    raise AssertionError("no progress after 1000 conflicts")
            return conflicts

        await asyncio.gather(*(worker(n) for n in range(workers)))
        events = await w.events(keys + workers * rounds, timeout=20)
        assert await w.quiet(0.2) == []
        await w.close()
        revs = [e.revision for e in events]
        assert revs == sorted(set(revs))
        last: dict[str, int] = {}
        for e in events:  # every key counts up by one, each step seen once
            value = int(e.kv.value)
            assert value == last.get(e.kv.key, -1) + 1
            if e.prev_kv is not None:
                assert int(e.prev_kv.value) == last[e.kv.key]
            last[e.kv.key] = value
        assert sum(last.values()) == workers * rounds
        items, _ = await store.list(p)
        assert {kv.key: int(kv.value) for kv in items} == last

    backend.run(body)


def test_bookmarks_arrive_while_idle(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        kv = await store.create(p + "a", b"1")
        w = Recorder(store.watch(p, kv.mod_revision + 1, progress_interval=0.2))
        first = await w.bookmark(timeout=10)
        assert first.revision >= kv.mod_revision
        # Writes outside the prefix advance the bookmarks of a filtered watch.
        other = await store.create(p[:-1] + "0", b"x")
        while (await w.bookmark(timeout=10)).revision < other.mod_revision:
            pass
        assert await w.quiet(0) == []
        await w.close()

    backend.run(body)


def test_watch_from_zero_starts_at_the_next_revision(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        await store.create(p + "old", b"x")
        w = Recorder(store.watch(p))
        await asyncio.sleep(0.2)  # let the watch establish before the next write
        new = await store.create(p + "new", b"y")
        [event] = await w.events(1)
        assert event.kv == new
        await w.close()

    backend.run(body)


def test_open_watches_end_when_the_store_closes(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        kv = await store.create(p + "a", b"1")
        watch = store.watch(p, kv.mod_revision)
        assert isinstance(await anext(watch), Event)
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.1)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 10)

    backend.run(body)


# --------------------------------------------------------------------------- compaction


def test_compaction_then_old_revisions_are_gone(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        a1 = await store.create(p + "a", b"1")
        a2 = await store.update(p + "a", b"2", a1.mod_revision)
        b1 = await store.create(p + "b", b"1")
        mid = b1.mod_revision
        a3 = await store.update(p + "a", b"3", a2.mod_revision)
        await store.delete(p + "b")
        end = await store.current_revision()
        await store.compact(mid)

        with pytest.raises(Compacted) as exc:
            await store.list(p, revision=a2.mod_revision)
        if backend.embedded:
            assert exc.value.compact_revision == mid
        with pytest.raises(Compacted):
            await store.get(p + "a", revision=a1.mod_revision)
        w = Recorder(store.watch(p, a2.mod_revision))
        assert isinstance(await w.error(), Compacted)
        await w.close()

        # At the compact revision itself, reads and watches still work.
        assert await store.list(p, revision=mid) == ([a2, b1], mid)
        w = Recorder(store.watch(p, mid))
        events = await w.events(3)
        assert [(e.type, e.kv.key) for e in events] == [
            (EventType.PUT, p + "b"),
            (EventType.PUT, p + "a"),
            (EventType.DELETE, p + "b"),
        ]
        assert events[1].kv == a3 and events[1].prev_kv == a2 and events[2].prev_kv == b1
        await w.close()
        items, rev = await store.list(p)
        assert items == [a3]
        assert rev == end if backend.embedded else rev >= end  # etcd: compact_rev_key moved

        await store.compact(mid)  # again: no-op
        await store.compact(a1.mod_revision)  # older: no-op
        with pytest.raises(FutureRevision):
            await store.compact(end + 1000)

    backend.run(body)


# --------------------------------------------------------------------------- leases


def test_lease_expiry_deletes_keys_with_delete_events(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        lease = await store.grant_lease(1)
        l1 = await store.create(p + "l1", b"1", lease=lease)
        l2 = await store.create(p + "l2", b"2", lease=lease)
        keep = await store.create(p + "keep", b"3")
        assert l1.lease == lease
        w = Recorder(store.watch(p, keep.mod_revision + 1))
        events = await w.events(2, timeout=15)
        assert {(e.type, e.kv.key) for e in events} == {
            (EventType.DELETE, p + "l1"),
            (EventType.DELETE, p + "l2"),
        }
        assert {e.prev_kv for e in events} == {l1, l2}
        await w.close()
        with pytest.raises(NotFound):
            await store.get(p + "l1")
        assert await store.get(p + "keep") == keep
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)
        with pytest.raises(LeaseNotFound):
            await store.create(p + "late", b"x", lease=lease)

    backend.run(body)


def test_lease_keepalive_and_revoke(backend: Backend) -> None:
    async def body(store: Store, p: str) -> None:
        lease = await store.grant_lease(2)
        kv = await store.create(p + "held", b"1", lease=lease)
        detached = await store.create(p + "detached", b"1", lease=lease)
        detached = await store.update(detached.key, b"2", detached.mod_revision, lease=0)
        assert detached.lease == 0
        for _ in range(3):  # 3 s > the 2 s TTL: only keepalives keep the key
            await asyncio.sleep(1)
            assert await store.keepalive(lease) >= 1
        assert await store.get(kv.key) == kv
        w = Recorder(store.watch(p, await store.current_revision() + 1))
        await store.revoke_lease(lease)
        [event] = await w.events(1)
        assert (event.type, event.prev_kv) == (EventType.DELETE, kv)
        await w.close()
        assert await store.get(detached.key) == detached
        with pytest.raises(LeaseNotFound):
            await store.revoke_lease(lease)

    backend.run(body, timeout=45)


# --------------------------------------------------------------------------- embedded only


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_watcher_behind_the_window_gets_compacted(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        store: Store
        if kind == "memory":
            store = MemoryStore(watch_window=10)
        else:
            store = await SqliteStore.open(tmp_path / "w.db", watch_window=10)
        try:
            first = await store.create("/w/0", b"0")
            watch = store.watch("/w/", first.mod_revision)
            assert isinstance(await anext(watch), Event)
            for i in range(1, 30):  # the window moves past the slow watcher
                await store.create(f"/w/{i}", b"x")
            with pytest.raises(Compacted):
                await anext(watch)
            with pytest.raises(Compacted):
                await anext(aiter(store.watch("/w/", first.mod_revision)))
            # Reads are not limited by the watch window, only by compaction.
            assert (await store.get("/w/0", revision=first.mod_revision)) == first
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# --------------------------------------------------------------------------- sqlite only


def test_sqlite_restart_loses_nothing_and_revisions_continue(tmp_path: Path) -> None:
    path = tmp_path / "restart.db"

    async def before() -> tuple[list[Any], int, list[Event]]:
        store = await SqliteStore.open(path)
        try:
            w = Recorder(store.watch("/r/", 1))
            kv = {}
            for i in range(20):
                kv[i] = await store.create(f"/r/{i:02}", f"v{i}".encode())
            for i in range(0, 20, 2):
                await store.update(f"/r/{i:02}", b"updated", kv[i].mod_revision)
            for i in range(0, 20, 5):
                await store.delete(f"/r/{i:02}")
            events = await w.events(34)
            await w.close()
            items, rev = await store.list("/r/")
            return items, rev, events
        finally:
            await store.close()

    async def after(items: list[Any], rev: int, events: list[Event]) -> None:
        store = await SqliteStore.open(path)
        try:
            assert await store.current_revision() == rev
            assert await store.list("/r/") == (items, rev)
            for kv in items:
                assert await store.get(kv.key) == kv
            # The watch history survives too: resume from before the restart.
            w = Recorder(store.watch("/r/", events[10].revision))
            assert await w.events(len(events) - 10) == events[10:]
            nxt = await store.create("/r/new", b"x")
            assert nxt.mod_revision == rev + 1
            [event] = await w.events(1)
            assert event.kv == nxt
            await w.close()
        finally:
            await store.close()

    items, rev, events = asyncio.run(before())
    assert rev == 34
    asyncio.run(after(items, rev, events))


_CRASH_WRITER = """
import asyncio, sys
from kproxy.store import SqliteStore

async def main():
    store = await SqliteStore.open(sys.argv[1])
    for i in range(100000):
        kv = await store.create(f"/crash/{i:06}", b"x" * 100)
        print(i, kv.mod_revision, flush=True)

asyncio.run(main())
"""


def test_sqlite_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    acked: dict[str, int] = {}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            i, rev = line.split()
            acked[f"/crash/{int(i):06}"] = int(rev)
        proc.send_signal(signal.SIGKILL)  # mid-write, no chance to clean up
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len(acked) >= 300, "the writer did not get going"

    async def check() -> None:
        store = await SqliteStore.open(path)
        try:
            items, rev = await store.list("/crash/")
            found = {kv.key: kv.mod_revision for kv in items}
            assert acked.items() <= found.items()  # every acknowledged write survived
            assert sorted(found.values()) == list(range(1, rev + 1))  # and no gap
            assert (await store.create("/crash/after", b"y")).mod_revision == rev + 1
        finally:
            await store.close()

    asyncio.run(check())


def _file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_sqlite_compaction_in_batches_keeps_the_file_bounded(tmp_path: Path) -> None:
    path = tmp_path / "bounded.db"
    keys, retain, value = 20, 100, b"v" * 2048

    async def main() -> list[int]:
        store = await SqliteStore.open(path, compact_batch=50, watch_window=retain + 1)
        sizes = []
        try:
            kvs = [await store.create(f"/b/{k:02}", value) for k in range(keys)]
            for round_ in range(100):
                for k in range(keys):
                    kvs[k] = await store.update(kvs[k].key, value, kvs[k].mod_revision)
                if round_ % 10 == 9:
                    rev = await store.current_revision()
                    await store.compact(rev - retain)
                    sizes.append(_file_size(path))
            # History older than the compact revision is gone; the window is not.
            rev = await store.current_revision()
            with pytest.raises(Compacted):
                await store.list("/b/", revision=rev - retain - 1)
            assert len((await store.list("/b/", revision=rev - retain))[0]) == keys
            w = Recorder(store.watch("/b/", rev - retain))
            assert len(await w.events(retain + 1)) == retain + 1
            await w.close()
        finally:
            await store.close()
        return sizes

    sizes = asyncio.run(main())
    # 2 020 revisions of 2 KiB values (~4 MiB of history) written; what is kept is the
    # latest value per key plus the retained window, so the file must stay near that.
    assert max(sizes[3:]) < 1024 * 1024, sizes
    assert sizes[-1] <= max(sizes[:3]) * 1.5, sizes
    with sqlite3.connect(path) as conn:
        (rows,) = conn.execute("SELECT COUNT(*) FROM log").fetchone()
    assert rows <= keys + retain + 1


def test_sqlite_auto_compaction_keeps_a_window(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(
            tmp_path / "auto.db", auto_compact_interval=0.05, compact_retain=50
        )
        try:
            kv = await store.create("/a/k", b"0")
            for i in range(200):
                kv = await store.update("/a/k", str(i).encode(), kv.mod_revision)
            for _ in range(100):
                await asyncio.sleep(0.05)
                try:
                    await store.get("/a/k", revision=100)
                except Compacted as exc:
                    assert exc.compact_revision == kv.mod_revision - 50
                    break
            else:
                raise AssertionError("auto-compaction never ran")
            assert (await store.get("/a/k", revision=kv.mod_revision - 50)).value == b"149"
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# --------------------------------------------------------------------------- etcd only


@pytest.mark.etcd
def test_etcd_three_members_survive_losing_one(tmp_path: Path) -> None:
    """Writes go on after a member dies, and a watch resumed from the last revision it
    saw (on whichever member is left) misses nothing and duplicates nothing."""
    require_commands("etcd")
    try:
        from kproxy.store.etcd import EtcdStore
    except ImportError as exc:
        require(False, f"etcd backend unavailable: {exc}")
        raise

    async def retrying(op: Callable[[], Awaitable[Any]]) -> Any:
        for _ in range(100):  # an election takes about a second
            try:
                return await op()
            except StoreError as exc:
                if isinstance(exc, Conflict | NotFound | AlreadyExists):
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("the cluster did not recover in 10 s")

    async def main(cluster: EtcdCluster) -> None:
        store = await EtcdStore.connect(cluster.endpoints, timeout=3)
        try:
            start = await store.current_revision() + 1
            written = []
            for i in range(10):
                written.append((await store.create(f"/f/{i:02}", b"v")).mod_revision)
            first = Recorder(store.watch("/f/", start))
            seen = await first.events(10)
            cluster.members[0].stop()  # the channel's first (pick-first) endpoint
            await first.close()
            for i in range(10, 20):
                kv = await retrying(lambda i=i: store.create(f"/f/{i:02}", b"v"))
                written.append(kv.mod_revision)
            resumed = Recorder(store.watch("/f/", seen[-1].revision + 1))
            seen += await resumed.events(10, timeout=20)
            assert [e.revision for e in seen] == written
            await resumed.close()
        finally:
            await store.close()

    with etcd_cluster(tmp_path, size=3) as cluster:
        asyncio.run(asyncio.wait_for(main(cluster), 60))
