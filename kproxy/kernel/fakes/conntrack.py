"""A stateful in-memory stand-in for :class:`kproxy.kernel.conntrack.Conntrack`.

It owns a conntrack table (flows keyed by their original tuple, as the kernel's
hash is) and answers the same verbs with the same results and errors, held to
the kernel by ``tests/kernel/test_conntrack_contract.py``:

- :meth:`FakeConntrack.add` is the fake's stand-in for traffic: it records a
  flow as the kernel would on its first packet and gives it a fresh id, which
  :meth:`list_flows` reports;
- :meth:`delete` removes a flow whose original tuple is present and whose id, if
  the flow carries one, matches; anything else is not counted and not an error;
- a flow of the other family, or of a protocol without ports, makes
  :meth:`delete` raise :class:`~kproxy.kernel.conntrack.ConntrackError` with
  ``EINVAL`` before anything is deleted.

Listing order is insertion order; the kernel's is hash order, so callers must
not depend on either. Several handles (one per family) may share one table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kproxy.kernel.conntrack import Family, Flow, check_deletable

__all__ = ["FakeConntrack", "FakeConntrackState"]

_OrigKey = tuple[Family, int, object, object, int, int]


def _orig_key(flow: Flow) -> _OrigKey:
    return (
        flow.family,
        flow.protocol,
        flow.orig_src,
        flow.orig_dst,
        flow.orig_sport,
        flow.orig_dport,
    )


@dataclass
class FakeConntrackState:
    """The "kernel" table, shared by every handle made on it."""

    flows: dict[_OrigKey, Flow] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Every delete call's input, for tests that check what a caller asked for.
    delete_calls: list[tuple[Flow, ...]] = field(default_factory=list)


class FakeConntrack:
    """Same API as :class:`kproxy.kernel.conntrack.Conntrack`, on a :class:`FakeConntrackState`."""

    def __init__(self, family: Family = "ipv4", state: FakeConntrackState | None = None) -> None:
        self._family: Family = family
        self.state = state if state is not None else FakeConntrackState()

    @property
    def family(self) -> Family:
        return self._family

    def add(self, flow: Flow) -> Flow:
        """Record ``flow`` as traffic would; an existing original tuple is kept (with its id)."""
        key = _orig_key(flow)
        existing = self.state.flows.get(key)
        if existing is not None:
            return existing
        stored = replace(flow, id=next(self.state.ids))
        self.state.flows[key] = stored
        return stored

    def list_flows(self, protocol: int | None = None) -> list[Flow]:
        return [
            f
            for f in self.state.flows.values()
            if f.family == self._family and (protocol is None or f.protocol == protocol)
        ]

    def delete(self, flows: Iterable[Flow]) -> int:
        todo = tuple(flows)
        for flow in todo:
            check_deletable(self._family, flow)
        self.state.delete_calls.append(todo)
        deleted = 0
        for flow in todo:
            key = _orig_key(flow)
            present = self.state.flows.get(key)
            if present is None or (flow.id is not None and flow.id != present.id):
                continue
            del self.state.flows[key]
            deleted += 1
        return deleted
