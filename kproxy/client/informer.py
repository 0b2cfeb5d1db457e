"""Informers: list, then watch from the list's resourceVersion, into a local cache.

Owns :class:`Informer`, its :class:`Cache` (with indexes), the handler shape
(:class:`Handler`: ``on_add(obj)``, ``on_update(old, new)``, ``on_delete(obj)``, the same
shape as the proxy's sources), the :class:`ListerWatcher` protocol (so an in-process
store client can stand in for REST) and :class:`Backoff`.

The loop, as client-go's Reflector + shared informer:

1. LIST (paged); reconcile the cache against it — adds for new keys, updates for keys
   whose resourceVersion changed, deletes (with the last known object) for keys gone —
   then mark synced.
2. WATCH from the list's resourceVersion with bookmarks; ADDED/MODIFIED/DELETED are
   applied to the cache and then delivered; a BOOKMARK only advances the
   resourceVersion. When the server ends the watch (``timeoutSeconds``), watch again
   from the last resourceVersion seen.
3. A 410 (an ``ERROR`` event or status, :class:`~.errors.Gone`) means the history is
   gone: relist (step 1), which converges the cache and the handlers on the truth.
   Transport errors re-watch, other API errors relist, both after a jittered
   exponential backoff that resets once things work again.
4. Every ``resync_period`` each cached object is re-delivered as ``on_update(obj, obj)``.

Invariants: handlers see the cache already updated; events are delivered in the order
received, to handlers in the order added; a handler that raises is logged with the
object's key and does not stop the others or the informer. Objects handed out are the
cached ones — handlers must not mutate them. Everything runs on one asyncio loop, so
there is no locking. List items get ``kind``/``apiVersion`` filled in from the list
(the API omits them per item), so handlers can dispatch on kind.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy.client.errors import ApiStatusError, ClientError, Gone
from kproxy.client.rest import Resource, RestClient, WatchEvent
from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
IndexFunc = Callable[[Obj], Iterable[str]]

NAMESPACE_INDEX = "namespace"


class Handler(Protocol):
    def on_add(self, obj: Obj) -> None: ...
    def on_update(self, old: Obj, new: Obj) -> None: ...
    def on_delete(self, obj: Obj) -> None: ...


@dataclass(frozen=True, slots=True)
class FuncHandler:
    """A :class:`Handler` from optional callables."""

    add: Callable[[Obj], None] | None = None
    update: Callable[[Obj, Obj], None] | None = None
    delete: Callable[[Obj], None] | None = None

    def on_add(self, obj: Obj) -> None:
        if self.add is not None:
            self.add(obj)

    def on_update(self, old: Obj, new: Obj) -> None:
        if self.update is not None:
            self.update(old, new)

    def on_delete(self, obj: Obj) -> None:
        if self.delete is not None:
            self.delete(obj)


@dataclass(frozen=True, slots=True)
class PairHandler:
    """A :class:`Handler` over one ``(old, new)`` callback, the proxy sources' shape:
    ``(None, obj)`` on add, ``(old, new)`` on update, ``(obj, None)`` on delete."""

    callback: Callable[[Obj | None, Obj | None], None]

    def on_add(self, obj: Obj) -> None:
        self.callback(None, obj)

    def on_update(self, old: Obj, new: Obj) -> None:
        self.callback(old, new)

    def on_delete(self, obj: Obj) -> None:
        self.callback(obj, None)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``, or ``name`` for cluster-scoped objects (client-go's key)."""
    meta = _meta(obj)
    ns, name = meta.get("namespace"), meta.get("name")
    if not name:
        raise KProxyError(f"object without metadata.name: {str(obj)[:120]}")
    return f"{ns}/{name}" if ns else str(name)


def resource_version(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("resourceVersion") or "")


def namespace_index(obj: Obj) -> list[str]:
    return [str(_meta(obj).get("namespace") or "")]


def field_index(path: str) -> IndexFunc:
    """An index on a dotted field path, e.g. ``field_index("spec.nodeName")``."""
    parts = path.split(".")

    def index(obj: Obj) -> list[str]:
        value: Any = obj
        for part in parts:
            if not isinstance(value, Mapping):
                return []
            value = value.get(part)
        return [] if value is None or value == "" else [str(value)]

    return index


# ------------------------------------------------------------------------- cache


class Cache:
    """Objects by key, with secondary indexes (``namespace`` always present)."""

    def __init__(self, indexers: Mapping[str, IndexFunc] | None = None) -> None:
        self._items: dict[str, Obj] = {}
        self._indexers: dict[str, IndexFunc] = {NAMESPACE_INDEX: namespace_index}
        self._indexers.update(indexers or {})
        # index name → value → keys; and key → index name → values, to unindex cheaply.
        self._indices: dict[str, dict[str, set[str]]] = {n: {} for n in self._indexers}
        self._entries: dict[str, dict[str, list[str]]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: str) -> Obj | None:
        return self._items.get(key)

    def get_by_name(self, namespace: str | None, name: str) -> Obj | None:
        return self._items.get(f"{namespace}/{name}" if namespace else name)

    def keys(self) -> list[str]:
        return list(self._items)

    def by_index(self, index: str, value: str) -> list[Obj]:
        keys = self._indices[index].get(value, ())
        return [self._items[k] for k in sorted(keys)]

    def index_values(self, index: str) -> list[str]:
        return sorted(self._indices[index])

    def list(self) -> builtins.list[Obj]:
        return list(self._items.values())

    def add_indexer(self, name: str, fn: IndexFunc) -> None:
        self._indexers[name] = fn
        self._indices[name] = {}
        for key, obj in self._items.items():
            self._index_one(name, key, obj)

    def _index_one(self, index: str, key: str, obj: Obj) -> None:
        try:
            values = list(self._indexers[index](obj))
        except Exception:
            log.exception("index %r failed on %s; not indexed there", index, key)
            values = []
        self._entries.setdefault(key, {})[index] = values
        for v in values:
            self._indices[index].setdefault(v, set()).add(key)

    def _unindex(self, key: str) -> None:
        for index, values in self._entries.pop(key, {}).items():
            bucket = self._indices[index]
            for v in values:
                keys = bucket.get(v)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del bucket[v]

    def put(self, obj: Obj) -> Obj | None:
        """Store ``obj``; the previous object under its key, if any."""
        key = object_key(obj)
        old = self._items.get(key)
        if old is not None:
            self._unindex(key)
        self._items[key] = obj
        for index in self._indexers:
            self._index_one(index, key, obj)
        return old

    def remove(self, key: str) -> Obj | None:
        old = self._items.pop(key, None)
        if old is not None:
            self._unindex(key)
        return old


# ---------------------------------------------------------------- list and watch


class ListerWatcher(Protocol):
    """Where an informer's objects come from (REST, or an in-process store client)."""

    async def list(self, *, limit: int | None, continue_: str | None) -> Obj: ...

    def watch(
        self, *, resource_version: str, timeout_seconds: int | None, allow_bookmarks: bool
    ) -> AsyncIterator[WatchEvent]: ...


@dataclass(frozen=True)
class RestListerWatcher:
    client: RestClient
    resource: Resource
    namespace: str | None = None
    label_selector: str | None = None
    field_selector: str | None = None

    async def list(self, *, limit: int | None, continue_: str | None) -> Obj:
        return await self.client.list(
            self.resource,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            limit=limit,
            continue_=continue_,
        )

    def watch(
        self, *, resource_version: str, timeout_seconds: int | None, allow_bookmarks: bool
    ) -> AsyncIterator[WatchEvent]:
        return self.client.watch(
            self.resource,
            self.namespace,
            resource_version=resource_version or None,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            allow_bookmarks=allow_bookmarks,
            timeout_seconds=timeout_seconds,
        )


@dataclass
class Backoff:
    """Jittered exponential backoff (client-go's reflector: 0.8 s doubling to 30 s)."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = 0.0

    def next(self) -> float:
        base = self._next or self.initial
        self._next = min(base * self.factor, self.cap)
        return base * (1 + self.jitter * random.random())

    def reset(self) -> None:
        self._next = 0.0


class Informer:
    """List+watch one resource into a :class:`Cache` and fan changes out to handlers."""

    def __init__(
        self,
        lister_watcher: ListerWatcher,
        *,
        name: str = "",
        resync_period: float | None = None,
        indexers: Mapping[str, IndexFunc] | None = None,
        backoff: Backoff | None = None,
        page_size: int = 500,
        watch_timeout: tuple[int, int] = (300, 600),
        min_watch_seconds: float = 1.0,
    ) -> None:
        self._lw = lister_watcher
        self.name = name or type(lister_watcher).__name__
        self.cache = Cache(indexers)
        self.resource_version = ""
        self._handlers: list[Handler] = []
        self._resync_period = resync_period
        self._backoff = backoff or Backoff()
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._min_watch_seconds = min_watch_seconds
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.relists = 0  # lists after the first one: a health signal for tests and metrics

    # ------------------------------------------------------------------ public

    def add_handler(self, handler: Handler) -> None:
        """Register ``handler``; if already synced, it first gets ``on_add`` for the cache."""
        self._handlers.append(handler)
        if self.has_synced():
            for obj in self.cache.list():
                self._call(handler.on_add, obj)

    def has_synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        if self._tasks:
            raise KProxyError(f"informer {self.name} already started")
        task = asyncio.create_task(self.run(), name=f"informer:{self.name}")
        task.add_done_callback(self._log_crash)
        self._tasks.append(task)
        if self._resync_period:
            self._tasks.append(
                asyncio.create_task(self._resync_loop(), name=f"informer-resync:{self.name}")
            )

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        # run() only ends by cancellation; anything else is a bug that must be seen.
        if not task.cancelled() and task.exception() is not None:
            log.error("informer %s stopped", self.name, exc_info=task.exception())

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # A crash was already logged by _log_crash; stopping must not raise it again.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            try:
                await self._list()
            except (ClientError, KProxyError) as exc:
                delay = self._backoff.next()
                log.warning("informer %s: list failed (%s); retry in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                continue
            await self._watch_until_relist()

    # ---------------------------------------------------------------- internal

    async def _list(self) -> None:
        items: list[Obj] = []
        token: str | None = None
        first: Obj | None = None
        while True:
            try:
                page = await self._lw.list(limit=self._page_size, continue_=token)
            except Gone:
                if token is None:
                    raise
                # The continue token expired mid-list: start over, consistently.
                log.info("informer %s: continue token expired; listing again", self.name)
                items, token, first = [], None, None
                continue
            first = first or page
            kind = str(page.get("kind") or "").removesuffix("List")
            api_version = page.get("apiVersion")
            for item in page.get("items") or ():
                if kind and "kind" not in item:
                    item["kind"] = kind
                if api_version and "apiVersion" not in item:
                    item["apiVersion"] = api_version
                items.append(item)
            token = (page.get("metadata") or {}).get("continue") or None
            if not token:
                break
        if self.has_synced():
            self.relists += 1
        self._replace(items)
        self.resource_version = str((first.get("metadata") or {}).get("resourceVersion") or "")
        self._synced.set()
        log.debug("informer %s: listed %d at rv %s", self.name, len(items), self.resource_version)

    def _replace(self, items: list[Obj]) -> None:
        seen: set[str] = set()
        for obj in items:
            try:
                key = object_key(obj)
            except KProxyError as exc:
                log.error("informer %s: skipping listed object: %s", self.name, exc)
                continue
            seen.add(key)
            old = self.cache.get(key)
            if old is not None and resource_version(old) == resource_version(obj) != "":
                continue
            self.cache.put(obj)
            if old is None:
                self._deliver("on_add", obj)
            else:
                self._deliver("on_update", old, obj)
        for key in sorted(set(self.cache.keys()) - seen):
            old = self.cache.remove(key)
            if old is not None:
                self._deliver("on_delete", old)

    async def _watch_until_relist(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, events = loop.time(), 0
            timeout = random.randint(*self._watch_timeout)
            try:
                stream = self._lw.watch(
                    resource_version=self.resource_version,
                    timeout_seconds=timeout,
                    allow_bookmarks=True,
                )
                async for event in stream:
                    events += 1
                    self._apply(event)
                    self._backoff.reset()
            except Gone as exc:
                log.info("informer %s: watch expired (%s); relisting", self.name, exc.message)
                return
            except ApiStatusError as exc:
                delay = self._backoff.next()
                log.warning(
                    "informer %s: watch failed (%s); relist in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                return
            except (ClientError, KProxyError) as exc:
                delay = self._backoff.next()
                log.warning(
                    "informer %s: watch broke (%s); rewatch in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            if events == 0 and loop.time() - started < self._min_watch_seconds:
                # The server keeps closing at once: do not spin.
                await asyncio.sleep(self._backoff.next())
            else:
                self._backoff.reset()

    def _apply(self, event: WatchEvent) -> None:
        obj = event.object
        rv = resource_version(obj)
        if event.type == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        try:
            key = object_key(obj)
        except KProxyError as exc:
            log.error("informer %s: skipping %s event: %s", self.name, event.type, exc)
            return
        if event.type in ("ADDED", "MODIFIED"):
            old = self.cache.put(obj)
            if old is None:
                self._deliver("on_add", obj)
            else:
                self._deliver("on_update", old, obj)
        elif event.type == "DELETED":
            old = self.cache.remove(key)
            if old is not None:
                # The event carries the final state, which is newer than the cache's.
                self._deliver("on_delete", obj)
            else:
                log.debug("informer %s: DELETED for unknown %s", self.name, key)
        else:
            log.warning("informer %s: ignoring event type %r for %s", self.name, event.type, key)
            return
        if rv:
            self.resource_version = rv

    async def _resync_loop(self) -> None:
        assert self._resync_period
        while True:
            await asyncio.sleep(self._resync_period)
            if self.has_synced():
                for obj in self.cache.list():
                    self._deliver("on_update", obj, obj)

    def _deliver(self, method: str, *args: Obj) -> None:
        for handler in self._handlers:
            self._call(getattr(handler, method), *args)

    def _call(self, fn: Callable[..., None], *args: Obj) -> None:
        try:
            fn(*args)
        except Exception:
            key = object_key(args[-1]) if args else "?"
            log.exception("informer %s: handler %s failed on %s", self.name, fn, key)


async def wait_for_cache_sync(*informers: Informer, timeout: float | None = None) -> bool:
    """True once every informer has synced (False on timeout)."""
    results = await asyncio.gather(*(i.wait_synced(timeout) for i in informers))
    return all(results)
