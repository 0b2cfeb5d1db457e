"""WATCH: a store watch turned into Kubernetes watch events on a chunked response.

Owns :func:`serve_watch`. The response is HTTP 200 with newline-delimited JSON
``{"type": ..., "object": ...}``, one event per line, flushed as it happens.

Semantics kept from kube-apiserver:

- events are strictly after the requested resourceVersion (the store watch starts at
  RV + 1); without one (or "0") the current objects come first as ADDED;
  ``sendInitialEvents=true`` does the same and ends them with a BOOKMARK annotated
  ``k8s.io/initial-events-end``;
- label and field selectors filter events; an object that stops matching is sent as
  DELETED (its previous state), one that starts matching as ADDED;
- BOOKMARK events carry only ``metadata.resourceVersion`` and go out only with
  ``allowWatchBookmarks=true``;
- a too-old resourceVersion (compacted history) is HTTP 200 and then one ERROR event
  whose object is a 410 ``Expired`` Status, as the cacher does;
- ``timeoutSeconds`` ends the stream cleanly.

Invariants: the store iterator is always closed (``aclose``) when the stream ends,
however it ends; a client that went away is noticed at the next event or idle tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kproxy.api.errors import ApiError
from kproxy.api.kinds import Kind
from kproxy.apiserver import tables
from kproxy.apiserver.listing import ListQuery
from kproxy.store import Bookmark, Compacted, Event, EventType, Store

log = logging.getLogger(__name__)

INITIAL_EVENTS_END = "k8s.io/initial-events-end"


@dataclass(frozen=True, slots=True)
class WatchOptions:
    query: ListQuery
    resource_version: int | None
    bookmarks: bool
    timeout: float
    send_initial_events: bool = False
    table: bool = False


class _Writer:
    """Serialises events onto the response; remembers whether the client is gone."""

    def __init__(self, resp: web.StreamResponse, kind: Kind, as_table: bool) -> None:
        self.resp = resp
        self.kind = kind
        self.as_table = as_table
        self.sent_columns = False
        self.gone = False

    async def send(self, etype: str, obj: Mapping[str, Any]) -> None:
        if self.as_table and etype not in ("ERROR", "BOOKMARK"):
            # Column definitions only once: kubectl keeps the first event's.
            obj = tables.table(self.kind, [obj], columns=not self.sent_columns)
            self.sent_columns = True
        line = json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode()
        try:
            await self.resp.write(line + b"\n")
        except (ConnectionError, RuntimeError):
            self.gone = True

    async def bookmark(self, revision: int, *, initial_end: bool = False) -> None:
        meta: dict[str, Any] = {"resourceVersion": str(revision)}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        await self.send(
            "BOOKMARK",
            {"kind": self.kind.kind, "apiVersion": self.kind.api_version, "metadata": meta},
        )


def _decode(value: bytes, revision: int) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
    return obj


def translate(kind: Kind, query: ListQuery, event: Event) -> tuple[str, dict[str, Any]] | None:
    """The watch event (type, object) a store event becomes for ``query``, if any."""
    rev = event.revision
    prev = _decode(event.prev_kv.value, rev) if event.prev_kv is not None else None
    prev_ok = prev is not None and query.matches(kind, prev)
    if event.type is EventType.DELETE:
        return ("DELETED", prev) if prev is not None and prev_ok else None
    cur = _decode(event.kv.value, rev)
    cur_ok = query.matches(kind, cur)
    if cur_ok:
        return ("MODIFIED" if prev_ok else "ADDED"), cur
    if prev_ok and prev is not None:
        return "DELETED", prev
    return None


def _transport_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def serve_watch(
    request: web.Request,
    store: Store,
    kind: Kind,
    prefix: str,
    opts: WatchOptions,
    *,
    idle_tick: float,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    if opts.table:
        resp.headers["Content-Type"] = tables.TABLE_CONTENT_TYPE
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    writer = _Writer(resp, kind, opts.table)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + opts.timeout
    start = (opts.resource_version or 0) + 1
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            if not opts.resource_version or opts.send_initial_events:
                kvs, revision = await store.list(prefix)
                for kv in kvs:
                    obj = _decode(kv.value, kv.mod_revision)
                    if opts.query.matches(kind, obj):
                        await writer.send("ADDED", obj)
                if opts.send_initial_events and opts.bookmarks:
                    await writer.bookmark(revision, initial_end=True)
                start = revision + 1
            await _stream(request, store, kind, prefix, opts, writer, start, idle_tick)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()
    return resp


async def _stream(
    request: web.Request,
    store: Store,
    kind: Kind,
    prefix: str,
    opts: WatchOptions,
    writer: _Writer,
    start: int,
    idle_tick: float,
) -> None:
    items = store.watch(prefix, start, progress_interval=idle_tick)
    try:
        async for item in items:
            if writer.gone or _transport_gone(request):
                return
            if isinstance(item, Bookmark):
                if opts.bookmarks and item.revision >= start - 1 and item.revision > 0:
                    await writer.bookmark(item.revision)
                continue
            translated = translate(kind, opts.query, item)
            if translated is not None:
                await writer.send(*translated)
    except Compacted as exc:
        error = ApiError.too_old_resource_version(exc.requested - 1, exc.compact_revision)
        await writer.send("ERROR", error.to_status())
    finally:
        with contextlib.suppress(Exception):
            await items.aclose()  # type: ignore[attr-defined]
