"""The store contract: one revisioned key-value interface for every backend.

Owns the data types (:class:`KeyValue`, :class:`Event`, :class:`Bookmark`), the
errors, and the abstract :class:`Store`. The shape is etcd v3's, narrowed to what
kube-apiserver actually uses, so the etcd backend is a direct mapping and the
embedded backends (memory, sqlite) behave the same way.

Invariants every backend keeps (the contract suite checks them):

- One store-wide ``revision`` counter. Every successful mutation advances it, and the
  mutated key's ``mod_revision`` is the new revision. Revisions never go backwards,
  also across a restart. The embedded backends are gap-free (one revision per
  mutation); etcd may advance it for things we do not see (compaction bookkeeping).
- ``create`` succeeds only if the key is absent; ``update``/``delete`` succeed only
  if the key's current ``mod_revision`` equals the expected one (a compare-and-swap),
  otherwise :class:`Conflict` carries the current value.
- ``list`` returns a consistent snapshot and the revision it was taken at.
- ``watch(prefix, start_revision)`` delivers every event on keys under ``prefix``
  whose revision is ``>= start_revision`` (inclusive, as etcd's ``WithRev``), in
  revision order, each exactly once, with the previous value. kube-apiserver, whose
  resourceVersion ``RV`` means "seen up to RV", watches from ``RV + 1``. To resume
  after the last event seen at revision ``r``, watch again from ``r + 1``.
  ``start_revision == 0`` means "from the next revision". A :class:`Bookmark` says
  every event up to its revision has been delivered (etcd progress notify,
  Kubernetes BOOKMARK). If the history needed is gone (``start_revision <`` the
  compact revision, or older than the embedded backends' in-memory watch window),
  the watch raises :class:`Compacted` on its first iteration.
- Keys are ``str`` and compare by code point (the same order as their UTF-8 bytes,
  which is what etcd and SQLite compare). Values are opaque ``bytes``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kproxy.errors import KProxyError

# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key's state at ``mod_revision`` (etcd's ``mvccpb.KeyValue``)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int = 1  # writes since creation; 1 after create
    lease: int = 0  # 0: no lease


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class Event:
    """A change to one key.

    For PUT, ``kv`` is the new state. For DELETE, ``kv`` has the key, empty value,
    ``create_revision == 0`` and ``mod_revision`` = the revision of the delete, as
    etcd reports it; the last value is in ``prev_kv``. ``prev_kv`` is ``None`` for a
    PUT that created the key.
    """

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @property
    def key(self) -> str:
        return self.kv.key


@dataclass(frozen=True, slots=True)
class Bookmark:
    """Progress: every event on the watched prefix up to ``revision`` was delivered."""

    revision: int


WatchItem = Event | Bookmark


def prefix_end(prefix: str) -> str | None:
    """The smallest key greater than every key starting with ``prefix``.

    ``None`` means "no upper bound" (empty prefix). Mirrors etcd's ``GetPrefixRangeEnd``
    on code points instead of bytes; the orders agree for UTF-8.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates are not valid in UTF-8 keys
                nxt = 0xE000
            chars[-1] = chr(nxt)
            return "".join(chars)
        chars.pop()
    return None


# --------------------------------------------------------------------------- errors


class StoreError(KProxyError):
    """Root of store errors."""


class StoreClosed(StoreError):
    """The store was closed."""


class NotFound(StoreError):
    """The key (or lease) does not exist. Maps to HTTP 404."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not found: {key}")
        self.key = key


class LeaseNotFound(NotFound):
    """The lease does not exist (never granted, revoked or expired)."""

    def __init__(self, lease: int) -> None:
        super().__init__(f"lease {lease}")
        self.lease = lease


class AlreadyExists(StoreError):
    """``create`` on a key that exists. Maps to HTTP 409 AlreadyExists."""

    def __init__(self, key: str, current: KeyValue | None = None) -> None:
        super().__init__(f"already exists: {key}")
        self.key = key
        self.current = current


class Conflict(StoreError):
    """The key's ``mod_revision`` is not the expected one. Maps to HTTP 409 Conflict.

    ``current`` is the key's current state, so the caller can retry without a get.
    """

    def __init__(self, key: str, expected: int, current: KeyValue) -> None:
        super().__init__(
            f"conflict on {key}: expected mod_revision {expected}, "
            f"current is {current.mod_revision}"
        )
        self.key = key
        self.expected = expected
        self.current = current


class Compacted(StoreError):
    """The requested revision is no longer available. Maps to HTTP 410 Gone/Expired.

    ``compact_revision`` is the oldest revision that can still be read at or watched
    from; anything older is gone. The client re-lists and watches from the list's
    revision + 1.
    """

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} has been compacted (compact revision {compact_revision})"
        )
        self.requested = requested
        self.compact_revision = compact_revision


class FutureRevision(StoreError):
    """A read or compaction asked for a revision the store has not reached."""

    def __init__(self, requested: int, current: int) -> None:
        super().__init__(f"revision {requested} is in the future (current {current})")
        self.requested = requested
        self.current = current


# --------------------------------------------------------------------------- contract


class Store(abc.ABC):
    """The asynchronous revisioned key-value store every backend implements."""

    @abc.abstractmethod
    async def get(self, key: str, *, revision: int | None = None) -> KeyValue:
        """The key's state (at ``revision``, default latest). Raises :class:`NotFound`,
        :class:`Compacted` (revision < compact revision), :class:`FutureRevision`."""

    @abc.abstractmethod
    async def list(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int | None = None,
        start_after: str | None = None,
    ) -> tuple[list[KeyValue], int]:
        """Keys under ``prefix`` in key order, and the revision of the snapshot.

        Pagination: ask for ``limit + 1`` items to learn whether more remain; fetch the
        next page with ``revision=<first page's revision>`` and ``start_after=<last
        key>`` so that all pages come from one snapshot (:class:`Compacted` if that
        revision is gone: HTTP 410 for an expired ``continue``).
        """

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, *, lease: int = 0) -> KeyValue:
        """Create ``key`` if absent (else :class:`AlreadyExists`); returns the new state."""

    @abc.abstractmethod
    async def update(
        self, key: str, value: bytes, expected_mod_revision: int, *, lease: int = 0
    ) -> KeyValue:
        """Replace ``key``'s value if its mod_revision is ``expected_mod_revision``.

        :class:`NotFound` if absent, :class:`Conflict` (with the current state) if the
        revision differs. ``lease`` replaces the key's lease (0 detaches it), as a put.
        """

    @abc.abstractmethod
    async def delete(self, key: str, expected_mod_revision: int | None = None) -> KeyValue:
        """Delete ``key`` (guarded when ``expected_mod_revision`` is given); returns the
        deleted state. The delete's revision is ``await current_revision()`` right
        after, or the DELETE event's revision."""

    @abc.abstractmethod
    def watch(
        self, prefix: str, start_revision: int = 0, *, progress_interval: float | None = None
    ) -> AsyncIterator[WatchItem]:
        """Events on keys under ``prefix`` from ``start_revision`` (inclusive); see the
        module docstring. With ``progress_interval``, a :class:`Bookmark` is sent after
        that many idle seconds (etcd: at the server's progress-notify interval).
        Iteration ends when the store closes. Close the iterator with ``aclose()``
        (it is an async generator) to release it early."""

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """The store's latest revision."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Discard history older than ``revision``. Afterwards reads at and watches from
        revisions ``< revision`` raise :class:`Compacted`. Compacting to an already
        compacted revision is a no-op; beyond the current one, :class:`FutureRevision`."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> int:
        """A new lease that expires ``ttl`` seconds from now unless kept alive. Keys
        attached to it are deleted (as DELETE events) when it expires."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> int:
        """Restart the lease's countdown; returns its TTL. :class:`LeaseNotFound` if gone."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """Delete the lease and its keys now. :class:`LeaseNotFound` if gone."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources; open watches end. Idempotent."""
