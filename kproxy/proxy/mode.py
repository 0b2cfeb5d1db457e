"""The contract between the proxy loop and a proxy mode (DESIGN.md §2).

A mode turns a :class:`~kproxy.proxy.core.Snapshot` into kernel state. It is
a pure planner (snapshot → rules, no I/O) plus a thin applier; the loop in
:mod:`kproxy.proxy.proxier` decides *when* to sync and whether a sync is full,
the mode decides nothing about timing.

Invariants:

- ``sync`` never raises for a failure of the kernel it programs: it returns a
  :class:`SyncResult` with ``ok=False`` and the error text, and then makes its
  own next sync full (so that a half-applied partial state is repaired).
- ``full`` in the result is what was done: a mode may promote a requested
  partial sync to a full one (after its own failure), never the reverse.
- ``cleanup`` removes everything the mode ever created and is idempotent.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kproxy.proxy.core import Snapshot

__all__ = ["Mode", "SyncResult", "paused_gc"]


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one :meth:`Mode.sync` did."""

    full: bool
    ok: bool
    # Rules written per table in this sync (``{"filter": 10, "nat": 55}``).
    rules_written: Mapping[str, int] = field(default_factory=dict)
    # Rules the mode owns per table after this sync (written + untouched - deleted).
    rules_total: Mapping[str, int] = field(default_factory=dict)
    error: str = ""
    deleted_chains: int = 0


@runtime_checkable
class Mode(Protocol):
    """A proxy mode: ``iptables``, ``ipvs`` or ``userspace``."""

    @property
    def name(self) -> str: ...

    def sync(self, snapshot: Snapshot, full: bool) -> SyncResult: ...

    def cleanup(self) -> None: ...


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block (a full sync, say).

    A full plan allocates hundreds of thousands of acyclic objects while the
    snapshot holds millions: every allocation-triggered collection of the old
    generation walks them all, which made a 5,000-Service plan grow 10x for 5x
    the Services.  Reference counting still frees everything; cycles wait for
    the next collection after the block.  A caller that disabled the collector
    keeps it disabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
