"""kproxy.store: the revisioned key-value store under the apiserver.

Owns one contract (:class:`~kproxy.store.base.Store`: get, list with revision,
create-if-absent, update/delete guarded by the expected mod_revision, watch from a
revision with bookmarks and :class:`~kproxy.store.base.Compacted`, leases, compaction)
and its backends:

- :class:`~kproxy.store.sqlite.SqliteStore`, the embedded default (one file);
- :class:`~kproxy.store.memory.MemoryStore`, for tests;
- :class:`~kproxy.store.etcd.EtcdStore`, a real etcd v3 cluster (needs ``aetcd``,
  imported lazily, so this package imports without it).

The store knows nothing about Kubernetes kinds: keys are strings such as
``/registry/services/default/web`` and values are bytes. It imports only the stdlib,
:mod:`kproxy.errors` and (lazily) ``aetcd``.
"""

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
    prefix_end,
)
from kproxy.store.memory import MemoryStore
from kproxy.store.sqlite import SqliteStore

__all__ = [
    "AlreadyExists",
    "Bookmark",
    "Compacted",
    "Conflict",
    "Event",
    "EventType",
    "FutureRevision",
    "KeyValue",
    "LeaseNotFound",
    "MemoryStore",
    "NotFound",
    "SqliteStore",
    "Store",
    "StoreClosed",
    "StoreError",
    "WatchItem",
    "prefix_end",
]
