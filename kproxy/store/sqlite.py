"""The embedded default store: one SQLite file, one writer thread, pushed watches.

Owns the on-disk layout and the threading around it:

- ``log(rev PRIMARY KEY, key, value, create_rev, prev_rev, version, lease)`` is an
  append-only history, one row per revision; ``value IS NULL`` marks a delete.
  ``prev_rev`` points at the key's previous live row, which gives watch events their
  previous value after a restart.
- ``latest(key PRIMARY KEY, rev, lease)`` indexes each live key's current row, so get
  and list are index lookups, not ``MAX(rev) GROUP BY key`` over history (kine's slow
  query).
- ``meta`` holds the revision counter and the compaction state; ``leases`` the leases.

Invariants:

- Every mutation is one ``BEGIN IMMEDIATE`` transaction that appends to ``log``,
  updates ``latest`` and advances ``meta.revision`` together, so revisions are
  gap-free, need no fill rows, and a crash loses nothing that was acknowledged
  (an acknowledgement is sent only after COMMIT; WAL with ``synchronous=NORMAL``
  survives a process crash, ``FULL`` also a power loss).
- All SQL runs on one dedicated thread that owns the only connection: one writer,
  and the event loop never blocks on the disk.
- Committed events are handed to the :class:`~kproxy.store.watch.WatchHub` from that
  thread with ``call_soon_threadsafe`` right after COMMIT, which keeps commit order,
  and before the writer's caller resumes. Nothing polls.
- Compaction first records the compact revision (refusing older reads), then prunes
  rows superseded at or before it in small transactions so writers interleave, then
  vacuums free pages and checkpoints the WAL, so the file stays bounded. Rows newer
  than the compact revision are never pruned: they are the watch history a restart
  reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

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
    StoreError,
    WatchItem,
    prefix_end,
)
from kproxy.store.memory import LeaseDeadlines, reap_leases
from kproxy.store.watch import DEFAULT_WINDOW, WatchHub

T = TypeVar("T")
_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log(
    rev INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value BLOB,
    create_rev INTEGER NOT NULL,
    prev_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_key_rev ON log(key, rev);
CREATE TABLE IF NOT EXISTS latest(
    key TEXT PRIMARY KEY, rev INTEGER NOT NULL, lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS latest_lease ON latest(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compact_revision', 0),
    ('compacted_through', 0);
CREATE TABLE IF NOT EXISTS leases(id INTEGER PRIMARY KEY AUTOINCREMENT, ttl INTEGER NOT NULL);
"""

_KV = "key, value, create_rev, rev, version, lease"

Row = tuple[Any, ...]
_Events = list[Event]  # a module alias: the class's own `list` method shadows the builtin


def _kv(row: Row) -> KeyValue:
    key, value, create_rev, rev, version, lease = row
    return KeyValue(key, bytes(value), create_rev, rev, version, lease)


class SqliteStore(Store):
    """The SQLite backend. Create with ``await SqliteStore.open(path)``."""

    def __init__(
        self,
        path: str | Path,
        *,
        watch_window: int,
        compact_batch: int,
        synchronous: Literal["NORMAL", "FULL"],
    ) -> None:
        self._path = str(path)
        self._watch_window = watch_window
        self._compact_batch = compact_batch
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kproxy-sqlite")
        self._loop = asyncio.get_running_loop()
        self._conn: sqlite3.Connection | None = None
        # Owned by the writer thread (read elsewhere only as plain ints):
        self._rev = 0
        self._next_rev = 0
        self._compact_rev = 0
        self._compacted_through = 0
        self._hub = WatchHub(head=0, window=watch_window)
        self._deadlines = LeaseDeadlines()
        self._tasks: list[asyncio.Task[None]] = []
        self._compact_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        watch_window: int = DEFAULT_WINDOW,
        compact_batch: int = 500,
        auto_compact_interval: float | None = None,
        compact_retain: int = 1000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> SqliteStore:
        """Open (creating if needed) the store at ``path``.

        With ``auto_compact_interval``, every that many seconds the store compacts
        itself to ``current - compact_retain`` (kube-apiserver instead compacts through
        :meth:`compact`; use one or the other).
        """
        self = cls(
            path, watch_window=watch_window, compact_batch=compact_batch, synchronous=synchronous
        )
        try:
            events, oldest, leases = await self._run(self._open_db)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._hub = WatchHub(head=self._rev, oldest=oldest, window=watch_window)
        self._hub.seed(events)
        # Like etcd after a restart, surviving leases get a full TTL again.
        for lease, ttl in leases:
            self._deadlines.grant(lease, ttl)
        self._tasks.append(
            self._loop.create_task(
                reap_leases(self._deadlines, self.revoke_lease), name="kproxy-sqlite-leases"
            )
        )
        if auto_compact_interval is not None:
            self._tasks.append(
                self._loop.create_task(
                    self._auto_compact(auto_compact_interval, compact_retain),
                    name="kproxy-sqlite-compact",
                )
            )
        return self

    # ------------------------------------------------------------------ thread plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreClosed(f"sqlite store {self._path} is closed")
        return await self._loop.run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "used before open"
        return self._conn

    def _meta(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def _open_db(self) -> tuple[list[Event], int, list[tuple[int, int]]]:
        conn = sqlite3.connect(self._path, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA journal_size_limit = 4194304")  # WAL shrinks back after bursts
        conn.executescript(_SCHEMA)
        self._rev = self._next_rev = self._meta("revision")
        self._compact_rev = self._meta("compact_revision")
        self._compacted_through = self._meta("compacted_through")
        self._prune(self._compact_rev)  # finish a compaction a crash interrupted
        start = max(self._compact_rev + 1, self._rev - self._watch_window + 1)
        rows = conn.execute(
            "SELECT l.key, l.value, l.create_rev, l.rev, l.version, l.lease, "
            "p.key, p.value, p.create_rev, p.rev, p.version, p.lease "
            "FROM log l LEFT JOIN log p ON l.prev_rev != 0 AND p.rev = l.prev_rev "
            "WHERE l.rev >= ? ORDER BY l.rev",
            (start,),
        ).fetchall()
        events = [self._event(r[:6], None if r[6] is None else _kv(r[6:])) for r in rows]
        leases = [(int(i), int(t)) for i, t in conn.execute("SELECT id, ttl FROM leases")]
        return events, start, leases

    @staticmethod
    def _event(row: Row, prev: KeyValue | None) -> Event:
        if row[1] is None:
            return Event(EventType.DELETE, KeyValue(row[0], b"", 0, row[3], 0, 0), prev)
        return Event(EventType.PUT, _kv(row), prev)

    def _transaction(self, body: Callable[[_Events], T]) -> T:
        """Run ``body`` in one write transaction; publish its events after COMMIT."""
        events: _Events = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._next_rev = self._rev
            result = body(events)
            if self._next_rev != self._rev:
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE name = 'revision'", (self._next_rev,)
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._next_rev = self._rev
            raise
        self._rev = self._next_rev
        for event in events:
            self._loop.call_soon_threadsafe(self._hub.publish, event)
        return result

    # ------------------------------------------------------------------ reads (thread)

    def _read_revision(self, revision: int | None) -> int:
        if revision is None or revision == 0:
            return self._rev
        if revision < self._compact_rev:
            raise Compacted(revision, self._compact_rev)
        if revision > self._rev:
            raise FutureRevision(revision, self._rev)
        return revision

    def _latest(self, key: str) -> KeyValue | None:
        row = self._db.execute(
            f"SELECT {_KV} FROM log WHERE rev = (SELECT rev FROM latest WHERE key = ?)", (key,)
        ).fetchone()
        return None if row is None else _kv(row)

    def _get(self, key: str, revision: int | None) -> KeyValue:
        rev = self._read_revision(revision)
        if rev == self._rev:
            kv = self._latest(key)
        else:
            row = self._db.execute(
                f"SELECT {_KV} FROM log WHERE key = ? AND rev <= ? ORDER BY rev DESC LIMIT 1",
                (key, rev),
            ).fetchone()
            kv = None if row is None or row[1] is None else _kv(row)
        if kv is None:
            raise NotFound(key)
        return kv

    def _list(
        self, prefix: str, revision: int | None, limit: int | None, start_after: str | None
    ) -> tuple[list[KeyValue], int]:
        # One connection on one thread: no write can land between these statements.
        rev = self._read_revision(revision)
        where, args = ["key >= ?"], [prefix]
        end = prefix_end(prefix)
        if end is not None:
            where.append("key < ?")
            args.append(end)
        if start_after is not None:
            where.append("key > ?")
            args.append(start_after)
        cond = " AND ".join(where)
        lim = -1 if limit is None else limit
        if rev == self._rev:
            sql = (
                f"SELECT l.key, l.value, l.create_rev, l.rev, l.version, l.lease "
                f"FROM latest t JOIN log l ON l.rev = t.rev WHERE {cond.replace('key', 't.key')} "
                f"ORDER BY t.key LIMIT ?"
            )
            rows = self._db.execute(sql, (*args, lim)).fetchall()
        else:
            # SQLite takes the bare columns from the row holding MAX(rev).
            sql = (
                f"SELECT key, value, create_rev, rev, version, lease FROM ("
                f"SELECT key, value, create_rev, MAX(rev) AS rev, version, lease FROM log "
                f"WHERE {cond} AND rev <= ? GROUP BY key) "
                f"WHERE value IS NOT NULL ORDER BY key LIMIT ?"
            )
            rows = self._db.execute(sql, (*args, rev, lim)).fetchall()
        return [_kv(r) for r in rows], rev

    async def get(self, key: str, *, revision: int | None = None) -> KeyValue:
        return await self._run(self._get, key, revision)

    async def list(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int | None = None,
        start_after: str | None = None,
    ) -> tuple[list[KeyValue], int]:
        return await self._run(self._list, prefix, revision, limit, start_after)

    async def current_revision(self) -> int:
        if self._closed:
            raise StoreClosed(f"sqlite store {self._path} is closed")
        return self._rev

    # ------------------------------------------------------------------ writes (thread)

    def _append(
        self, events: _Events, key: str, value: bytes | None, cur: KeyValue | None, lease: int
    ) -> KeyValue:
        """Write ``key``'s next state (``None``: deleted) at the next revision."""
        self._next_rev += 1
        rev = self._next_rev
        prev_rev = 0 if cur is None else cur.mod_revision
        if value is None:
            self._db.execute(
                "INSERT INTO log VALUES (?, ?, NULL, 0, ?, 0, 0)", (rev, key, prev_rev)
            )
            self._db.execute("DELETE FROM latest WHERE key = ?", (key,))
            kv = KeyValue(key, b"", 0, rev, 0, 0)
            events.append(Event(EventType.DELETE, kv, cur))
            return kv
        create_rev = rev if cur is None else cur.create_revision
        version = 1 if cur is None else cur.version + 1
        kv = KeyValue(key, value, create_rev, rev, version, lease)
        self._db.execute(
            "INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rev, key, value, create_rev, prev_rev, version, lease),
        )
        self._db.execute("INSERT OR REPLACE INTO latest VALUES (?, ?, ?)", (key, rev, lease))
        events.append(Event(EventType.PUT, kv, cur))
        return kv

    def _check_lease(self, lease: int) -> None:
        if (
            lease
            and self._db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None
        ):
            raise LeaseNotFound(lease)

    def _create(self, events: _Events, key: str, value: bytes, lease: int) -> KeyValue:
        cur = self._latest(key)
        if cur is not None:
            raise AlreadyExists(key, cur)
        self._check_lease(lease)
        return self._append(events, key, value, None, lease)

    def _update(
        self, events: _Events, key: str, value: bytes, expected: int, lease: int
    ) -> KeyValue:
        cur = self._latest(key)
        if cur is None:
            raise NotFound(key)
        if cur.mod_revision != expected:
            raise Conflict(key, expected, cur)
        self._check_lease(lease)
        return self._append(events, key, value, cur, lease)

    def _delete(self, events: _Events, key: str, expected: int | None) -> KeyValue:
        cur = self._latest(key)
        if cur is None:
            raise NotFound(key)
        if expected is not None and cur.mod_revision != expected:
            raise Conflict(key, expected, cur)
        self._append(events, key, None, cur, 0)
        return cur

    def _revoke(self, events: _Events, lease: int) -> None:
        if self._db.execute("DELETE FROM leases WHERE id = ?", (lease,)).rowcount == 0:
            raise LeaseNotFound(lease)
        keys = [
            k
            for (k,) in self._db.execute(
                "SELECT key FROM latest WHERE lease = ? ORDER BY key", (lease,)
            )
        ]
        for key in keys:
            self._append(events, key, None, self._latest(key), 0)

    def _grant(self, events: _Events, ttl: int) -> int:
        cur = self._db.execute("INSERT INTO leases(ttl) VALUES (?)", (ttl,))
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue:
        body = functools.partial(self._create, key=key, value=bytes(value), lease=lease)
        return await self._run(self._transaction, body)

    async def update(
        self, key: str, value: bytes, expected_mod_revision: int, *, lease: int = 0
    ) -> KeyValue:
        body = functools.partial(
            self._update, key=key, value=bytes(value), expected=expected_mod_revision, lease=lease
        )
        return await self._run(self._transaction, body)

    async def delete(self, key: str, expected_mod_revision: int | None = None) -> KeyValue:
        body = functools.partial(self._delete, key=key, expected=expected_mod_revision)
        return await self._run(self._transaction, body)

    # ------------------------------------------------------------------ watch

    def watch(
        self, prefix: str, start_revision: int = 0, *, progress_interval: float | None = None
    ) -> AsyncIterator[WatchItem]:
        if self._closed:
            raise StoreClosed(f"sqlite store {self._path} is closed")
        return self._hub.watch(prefix, start_revision, progress_interval)

    # ------------------------------------------------------------------ compaction

    def _set_compact_revision(self, revision: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,))
        self._compact_rev = revision

    def _prune_batch(self, after: int, target: int) -> int:
        """Prune the next ``compact_batch`` rows after revision ``after``; returns the last
        revision examined (``target`` when done).

        A row goes if a newer row of its key is at or before ``target``, or it is a
        delete: neither is needed to read at ``target`` or to replay events after it.
        Batches count rows, not revisions, so the survivors of earlier compactions
        (the latest row of each key) are re-examined without walking empty ranges.
        """
        row = self._db.execute(
            "SELECT rev FROM log WHERE rev > ? AND rev <= ? ORDER BY rev LIMIT 1 OFFSET ?",
            (after, target, self._compact_batch - 1),
        ).fetchone()
        hi = target if row is None else int(row[0])
        with self._write():
            self._db.execute(
                "DELETE FROM log WHERE rev > ? AND rev <= ? AND (value IS NULL OR EXISTS ("
                "SELECT 1 FROM log n WHERE n.key = log.key AND n.rev > log.rev AND n.rev <= ?))",
                (after, hi, target),
            )
            if hi == target:
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE name = 'compacted_through'", (target,)
                )
        if hi == target:
            self._compacted_through = target
        return hi

    def _prune(self, target: int) -> None:
        if self._compacted_through < target:
            after = 0
            while after < target:
                after = self._prune_batch(after, target)

    def _checkpoint(self) -> None:
        # executescript steps the pragma to completion; execute() frees one page per call.
        self._db.executescript("PRAGMA incremental_vacuum;")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    @contextlib.contextmanager
    def _write(self) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _record_compaction(self, revision: int) -> bool:
        if revision > self._rev:
            raise FutureRevision(revision, self._rev)
        if revision <= self._compact_rev:
            return False
        with self._write():
            self._set_compact_revision(revision)
        return True

    async def compact(self, revision: int) -> None:
        async with self._compact_lock:
            if not await self._run(self._record_compaction, revision):
                return
            self._hub.compact(revision)
            # One small transaction per batch, each its own job: writers queue between.
            after = 0
            while after < revision:
                after = await self._run(self._prune_batch, after, revision)
            await self._run(self._checkpoint)

    async def _auto_compact(self, interval: float, retain: int) -> None:
        while True:
            await asyncio.sleep(interval)
            target = self._rev - retain
            if target > self._compact_rev:
                try:
                    await self.compact(target)
                except (StoreError, sqlite3.Error):
                    # Keep trying on the next tick: a stalled compactor is how kine's
                    # files grew without bound, so it must not die silently either.
                    _log.exception("sqlite store %s: compaction to %d failed", self._path, target)

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl: int) -> int:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease: int = await self._run(self._transaction, functools.partial(self._grant, ttl=ttl))
        self._deadlines.grant(lease, ttl)
        return lease

    async def keepalive(self, lease: int) -> int:
        if self._closed:
            raise StoreClosed(f"sqlite store {self._path} is closed")
        return self._deadlines.keepalive(lease)

    async def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(LeaseNotFound):
            self._deadlines.remove(lease)
        await self._run(self._transaction, functools.partial(self._revoke, lease=lease))

    # ------------------------------------------------------------------ lifecycle

    def _close_db(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        if self._closed:
            return
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._hub.close()
        await self._loop.run_in_executor(self._executor, self._close_db)
        self._closed = True
        self._executor.shutdown(wait=True)
