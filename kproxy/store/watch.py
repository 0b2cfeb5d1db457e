"""The in-memory watch machinery shared by the embedded backends (memory, sqlite).

Owns :class:`WatchHub`: a bounded window of the most recent events, one per revision,
and the watchers reading it. Writers ``publish`` each committed event in revision
order (after the commit, from the event loop); watchers never get a queue of their
own. A watcher is a cursor (the next revision it wants) into the shared window, so:

- order and exactly-once follow from walking revisions one by one;
- a resumed watch (``start_revision = last seen + 1``) replays from the window, with
  no gap and no duplicate, however the two watches interleave with writers;
- memory is bounded by the window, not by the number or speed of watchers: a watcher
  that falls behind the window gets :class:`Compacted` (the client re-lists), rather
  than the hub buffering for it or silently dropping events (kine's failure mode).

Invariants: revisions published are gap-free (``head`` advances by exactly one per
event); ``oldest`` is the oldest revision a watch may start from, and every event
with ``oldest <= revision <= head`` is in the window. All methods run on the event
loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncGenerator, Iterable

from kproxy.store.base import Bookmark, Compacted, Event, StoreError, WatchItem

DEFAULT_WINDOW = 10_000


class WatchHub:
    """Broadcasts committed events to revision-cursor watchers from a bounded window."""

    def __init__(self, *, head: int, oldest: int | None = None, window: int = DEFAULT_WINDOW):
        if window < 1:
            raise ValueError("watch window must hold at least one event")
        self._window = window
        self._events: deque[Event] = deque()
        self._head = head
        # With no history loaded, only revisions after head can be watched.
        self._oldest = head + 1 if oldest is None else oldest
        self._pending: dict[int, Event] = {}
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def head(self) -> int:
        """The last published revision."""
        return self._head

    @property
    def oldest(self) -> int:
        """The oldest revision a watch may start from."""
        return self._oldest

    def seed(self, events: Iterable[Event]) -> None:
        """Load history (consecutive revisions ending at ``head``) before any watcher."""
        loaded = list(events)[-self._window :]
        if loaded:
            if loaded[-1].revision != self._head or any(
                b.revision != a.revision + 1 for a, b in itertools.pairwise(loaded)
            ):
                raise StoreError("watch history to seed is not gap-free up to head")
            self._events = deque(loaded)
            self._oldest = loaded[0].revision

    def publish(self, event: Event) -> None:
        """Add a committed event. Events arriving early wait for the missing revisions."""
        if event.revision <= self._head:
            raise StoreError(f"revision {event.revision} published twice (head {self._head})")
        self._pending[event.revision] = event
        advanced = False
        while (nxt := self._pending.pop(self._head + 1, None)) is not None:
            self._events.append(nxt)
            self._head += 1
            advanced = True
        if not advanced:
            return
        while len(self._events) > self._window:
            self._events.popleft()
        if self._events:
            self._oldest = max(self._oldest, self._events[0].revision)
        self._wake()

    def compact(self, revision: int) -> None:
        """Refuse watches from revisions older than ``revision`` and drop their events."""
        if revision <= self._oldest:
            return
        self._oldest = min(revision, self._head + 1)
        while self._events and self._events[0].revision < self._oldest:
            self._events.popleft()
        self._wake()  # watchers behind the new floor must fail now, not at the next write

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def watch(
        self, prefix: str, start_revision: int, progress_interval: float | None
    ) -> AsyncGenerator[WatchItem, None]:
        """Yield events under ``prefix`` from ``start_revision`` (0: the next one) on.

        Bookmarks go out when the watcher has caught up and nothing was yielded for
        ``progress_interval`` seconds. Ends when the hub closes.
        """
        loop = asyncio.get_running_loop()
        cursor = self._head + 1 if start_revision <= 0 else start_revision
        last_sent = loop.time()
        while not self._closed:
            wakeup = self._wakeup  # taken before the checks, so no publish is missed
            if cursor < self._oldest:
                raise Compacted(cursor, self._oldest)
            if cursor <= self._head:
                event = self._events[cursor - self._events[0].revision]
                cursor += 1
                if event.kv.key.startswith(prefix):
                    yield event
                    last_sent = loop.time()
                continue
            timeout: float | None = None
            if progress_interval is not None:
                timeout = last_sent + progress_interval - loop.time()
                if timeout <= 0:
                    yield Bookmark(min(self._head, cursor - 1))
                    last_sent = loop.time()
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout)
