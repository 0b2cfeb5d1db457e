"""The etcd v3 backend: the store contract over a real etcd cluster.

Owns the mapping of each store operation onto etcd's gRPC API, the same shapes
kube-apiserver sends (``staging/src/k8s.io/apiserver/pkg/storage/etcd3``), so several
apiservers can share one etcd:

- create = ``Txn(If(mod_revision(key) == 0), Then(Put), Else(Range))``;
- update = ``Txn(If(mod_revision(key) == expected), Then(Put prev_kv), Else(Range))``;
- delete = ``Txn(If(mod_revision(key) == expected | > 0), Then(Delete prev_kv), Else(Range))``;
- watch = one gRPC stream per watch with ``start_revision``, ``prev_kv`` and
  ``progress_notify``; an empty, non-created response is a progress notification
  (a :class:`~kproxy.store.base.Bookmark` at its header revision);
- compact = CAS on ``compact_rev_key``'s version, then ``Compact``, as the apiserver
  does, so concurrent compactors agree and the key records the compact revision.

It uses the generated stubs bundled in ``aetcd`` (``aetcd.rpc``; works with current
protobuf) directly, because ``aetcd``'s convenience client drops progress
notifications and historical/limited ranges. ``aetcd`` is imported lazily: this
module imports without it and fails only when a store is opened.

Semantics that differ from the embedded backends: revisions have gaps (compaction
bookkeeping writes ``compact_rev_key``), a lease revocation deletes all its keys in
one revision, and bookmarks follow the server's
``--experimental-watch-progress-notify-interval`` rather than ``progress_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from kproxy.store.base import (
    AlreadyExists,
    Bookmark,
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
)

COMPACT_REV_KEY = b"compact_rev_key"  # kube-apiserver's name, so both can coordinate


def _rpc() -> Any:
    try:
        from aetcd import rpc  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise StoreError("the etcd backend needs the 'aetcd' package") from exc
    return rpc


def _range_end(prefix: bytes) -> bytes:
    """etcd's GetPrefixRangeEnd: ``b"\\0"`` (everything from the key on) for ``b""``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        pb.key.decode(),
        bytes(pb.value),
        int(pb.create_revision),
        int(pb.mod_revision),
        int(pb.version),
        int(pb.lease),
    )


class EtcdStore(Store):
    """An etcd v3 cluster. Create with ``await EtcdStore.connect(["127.0.0.1:2379"])``."""

    def __init__(self, rpc: Any, channel: Any, timeout: float) -> None:
        self._rpc = rpc
        self._channel = channel
        self._timeout = timeout
        self._kv = rpc.KVStub(channel)
        self._watch = rpc.WatchStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: Sequence[str], *, timeout: float = 10.0) -> EtcdStore:
        """Connect to ``host:port`` endpoints (IPv4 literals for several; gRPC's
        pick-first policy fails over between them)."""
        rpc = _rpc()
        if not endpoints:
            raise ValueError("no etcd endpoints")
        target = endpoints[0] if len(endpoints) == 1 else "ipv4:" + ",".join(endpoints)
        store = cls(rpc, rpc.insecure_channel(target), timeout)
        try:
            await store.current_revision()
        except BaseException:
            await store.close()
            raise
        return store

    # ------------------------------------------------------------------ plumbing

    async def _call(self, method: Any, request: Any, *, lease: int = 0) -> Any:
        if self._closed:
            raise StoreClosed("etcd store is closed")
        try:
            return await method(request, timeout=self._timeout)
        except self._rpc.AioRpcError as exc:
            raise await self._error(exc, lease=lease) from exc

    async def _error(self, exc: Any, *, lease: int = 0, requested: int = 0) -> StoreError:
        details = str(exc.details() or "")
        if "lease not found" in details:
            return LeaseNotFound(lease)
        if "has been compacted" in details:
            return Compacted(requested, await self._compact_revision_hint(requested))
        if "future revision" in details:
            return FutureRevision(requested, await self.current_revision())
        return StoreError(f"etcd: {exc.code().name}: {details}")

    async def _compact_revision_hint(self, requested: int) -> int:
        """The compact revision recorded in ``compact_rev_key`` (best effort)."""
        with contextlib.suppress(Exception):
            resp = await self._kv.Range(
                self._rpc.RangeRequest(key=COMPACT_REV_KEY), timeout=self._timeout
            )
            if resp.kvs:
                return int(resp.kvs[0].value)
        return requested + 1

    def _range(self, key: bytes, **fields: Any) -> Any:
        return self._rpc.RangeRequest(key=key, **fields)

    def _txn(self, key: bytes, compare: Any, success: Any) -> Any:
        rpc = self._rpc
        return rpc.TxnRequest(
            compare=[compare],
            success=[success],
            failure=[rpc.RequestOp(request_range=self._range(key))],
        )

    def _mod_compare(self, key: bytes, result: str, revision: int) -> Any:
        cmp = self._rpc.Compare
        return cmp(
            key=key,
            target=cmp.MOD,
            result=getattr(cmp, result),
            mod_revision=revision,
        )

    # ------------------------------------------------------------------ reads

    async def get(self, key: str, *, revision: int | None = None) -> KeyValue:
        try:
            resp = await self._kv.Range(
                self._range(key.encode(), revision=revision or 0), timeout=self._timeout
            )
        except self._rpc.AioRpcError as exc:
            raise await self._error(exc, requested=revision or 0) from exc
        if not resp.kvs:
            raise NotFound(key)
        return _kv(resp.kvs[0])

    async def list(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int | None = None,
        start_after: str | None = None,
    ) -> tuple[list[KeyValue], int]:
        if self._closed:
            raise StoreClosed("etcd store is closed")
        raw = prefix.encode()
        start = raw
        if start_after is not None and start_after.encode() >= raw:
            start = start_after.encode() + b"\0"  # the smallest key after start_after
        request = self._range(
            start, range_end=_range_end(raw), revision=revision or 0, limit=limit or 0
        )
        try:
            resp = await self._kv.Range(request, timeout=self._timeout)
        except self._rpc.AioRpcError as exc:
            raise await self._error(exc, requested=revision or 0) from exc
        # The header carries the current revision; a read at a past one is "at" that one.
        return [_kv(pb) for pb in resp.kvs], revision or int(resp.header.revision)

    async def current_revision(self) -> int:
        resp = await self._call(self._kv.Range, self._range(COMPACT_REV_KEY, count_only=True))
        return int(resp.header.revision)

    # ------------------------------------------------------------------ writes

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue:
        raw, rpc = key.encode(), self._rpc
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease))
        txn = self._txn(raw, self._mod_compare(raw, "EQUAL", 0), put)
        resp = await self._call(self._kv.Txn, txn, lease=lease)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            raise AlreadyExists(key, _kv(kvs[0]) if kvs else None)
        rev = int(resp.header.revision)
        return KeyValue(key, bytes(value), rev, rev, 1, lease)

    async def update(
        self, key: str, value: bytes, expected_mod_revision: int, *, lease: int = 0
    ) -> KeyValue:
        raw, rpc = key.encode(), self._rpc
        put = rpc.RequestOp(
            request_put=rpc.PutRequest(key=raw, value=value, lease=lease, prev_kv=True)
        )
        # A compare against 0 would also match an absent key and turn this into a create.
        expected = expected_mod_revision if expected_mod_revision > 0 else -1
        txn = self._txn(raw, self._mod_compare(raw, "EQUAL", expected), put)
        resp = await self._call(self._kv.Txn, txn, lease=lease)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise NotFound(key)
            raise Conflict(key, expected_mod_revision, _kv(kvs[0]))
        prev = _kv(resp.responses[0].response_put.prev_kv)
        rev = int(resp.header.revision)
        return KeyValue(key, bytes(value), prev.create_revision, rev, prev.version + 1, lease)

    async def delete(self, key: str, expected_mod_revision: int | None = None) -> KeyValue:
        raw, rpc = key.encode(), self._rpc
        op = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw, prev_kv=True))
        if expected_mod_revision is None:
            cmp = self._mod_compare(raw, "GREATER", 0)  # exists
        else:
            cmp = self._mod_compare(raw, "EQUAL", expected_mod_revision or -1)
        resp = await self._call(self._kv.Txn, self._txn(raw, cmp, op))
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise NotFound(key)
            raise Conflict(key, expected_mod_revision or 0, _kv(kvs[0]))
        return _kv(resp.responses[0].response_delete_range.prev_kvs[0])

    # ------------------------------------------------------------------ watch

    def watch(
        self, prefix: str, start_revision: int = 0, *, progress_interval: float | None = None
    ) -> AsyncIterator[WatchItem]:
        if self._closed:
            raise StoreClosed("etcd store is closed")
        return self._watch_stream(prefix, start_revision, progress_interval is not None)

    async def _watch_stream(
        self, prefix: str, start_revision: int, progress: bool
    ) -> AsyncGenerator[WatchItem, None]:
        rpc = self._rpc
        raw = prefix.encode()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=raw,
                range_end=_range_end(raw),
                start_revision=max(start_revision, 0),
                prev_kv=True,
                progress_notify=progress,
            )
        )
        done = asyncio.Event()

        async def requests() -> AsyncGenerator[Any, None]:
            yield create
            await done.wait()  # keep the request side open for the life of the watch

        call = self._watch.Watch(requests())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(start_revision, int(resp.compact_revision))
                if resp.canceled:
                    raise StoreError(f"etcd canceled the watch: {resp.cancel_reason}")
                if resp.created:
                    continue
                if not resp.events:
                    yield Bookmark(int(resp.header.revision))
                    continue
                for ev in resp.events:
                    prev = _kv(ev.prev_kv) if ev.HasField("prev_kv") else None
                    if ev.type == rpc.Event.DELETE:
                        kv = KeyValue(ev.kv.key.decode(), b"", 0, int(ev.kv.mod_revision), 0, 0)
                        yield Event(EventType.DELETE, kv, prev)
                    else:
                        yield Event(EventType.PUT, _kv(ev.kv), prev)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                return  # grpc reports the channel closing under us as a cancellation
            raise
        except rpc.AioRpcError as exc:
            if exc.code() == rpc.StatusCode.CANCELLED and self._closed:
                return  # the store closed: the watch ends
            raise await self._error(exc, requested=start_revision) from exc
        finally:
            done.set()
            call.cancel()

    # ------------------------------------------------------------------ compaction

    async def compact(self, revision: int) -> None:
        rpc = self._rpc
        current = await self.current_revision()
        if revision > current:
            raise FutureRevision(revision, current)
        for _ in range(10):  # another apiserver may win the CAS; re-read and retry
            resp = await self._call(self._kv.Range, self._range(COMPACT_REV_KEY))
            version = int(resp.kvs[0].version) if resp.kvs else 0
            recorded = int(resp.kvs[0].value) if resp.kvs else 0
            if revision <= recorded:
                return
            cmp = rpc.Compare(
                key=COMPACT_REV_KEY,
                target=rpc.Compare.VERSION,
                result=rpc.Compare.EQUAL,
                version=version,
            )
            put = rpc.RequestOp(
                request_put=rpc.PutRequest(key=COMPACT_REV_KEY, value=str(revision).encode())
            )
            txn = rpc.TxnRequest(compare=[cmp], success=[put], failure=[])
            if (await self._call(self._kv.Txn, txn)).succeeded:
                break
        else:
            raise StoreError("compaction: lost the compact_rev_key race 10 times")
        try:
            await self._kv.Compact(
                rpc.CompactionRequest(revision=revision, physical=True), timeout=self._timeout
            )
        except rpc.AioRpcError as exc:
            if "has been compacted" not in str(exc.details() or ""):
                raise await self._error(exc, requested=revision) from exc

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl: int) -> int:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        resp = await self._call(self._lease.LeaseGrant, self._rpc.LeaseGrantRequest(TTL=ttl))
        if resp.error:
            raise StoreError(f"etcd: lease grant failed: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease: int) -> int:
        if self._closed:
            raise StoreClosed("etcd store is closed")
        request = self._rpc.LeaseKeepAliveRequest(ID=lease)

        async def one() -> AsyncGenerator[Any, None]:
            yield request

        call = self._lease.LeaseKeepAlive(one(), timeout=self._timeout)
        try:
            async for resp in call:
                if int(resp.TTL) <= 0:
                    raise LeaseNotFound(lease)
                return int(resp.TTL)
        except self._rpc.AioRpcError as exc:
            raise await self._error(exc, lease=lease) from exc
        finally:
            call.cancel()
        raise StoreError(f"etcd: no keepalive response for lease {lease}")

    async def revoke_lease(self, lease: int) -> None:
        await self._call(
            self._lease.LeaseRevoke, self._rpc.LeaseRevokeRequest(ID=lease), lease=lease
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._channel.close()
