"""The userspace mode's pluggable parts, chosen by name (``--userspace-relay``, ``--userspace-lb``).

Owns the mapping from flag values to implementations:

- relay ``splice``: :class:`~.splice.SpliceRelay` (the fast path's relay loop:
  splice(2) through pooled pipes in one thread, compiled C with the GIL
  released); ``asyncio``: :class:`~.relay.AsyncioRelay` (copies on the
  data-plane loop); ``auto`` (the default): ``splice`` when the fast path is
  compiled, else ``asyncio`` — the twin's relay loop works, but it runs Python
  per chunk in a second thread, which buys nothing over asyncio;
- load balancer ``rr`` (upstream's round robin with ClientIP affinity, the
  default) or ``maglev`` (Maglev source hashing of the client IP).

Invariant: every relay returned here has ``close()``; the mode calls it when it
stops, so a splice relay's thread and pipes never outlive the mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from kproxy import fastpath
from kproxy.errors import KProxyError
from kproxy.proxy.userspace.loadbalancer import LoadBalancer, RoundRobinLoadBalancer
from kproxy.proxy.userspace.maglev import MaglevLoadBalancer
from kproxy.proxy.userspace.relay import AsyncioRelay
from kproxy.proxy.userspace.splice import SpliceRelay

__all__ = [
    "LOAD_BALANCERS",
    "RELAYS",
    "ComponentError",
    "OwnedRelay",
    "new_load_balancer",
    "new_relay",
    "resolve_relay",
]

log = logging.getLogger(__name__)

RELAYS: Final = ("auto", "splice", "asyncio")
LOAD_BALANCERS: Final = ("rr", "maglev")

OwnedRelay = AsyncioRelay | SpliceRelay


class ComponentError(KProxyError):
    """An unknown relay or load-balancer name."""


def resolve_relay(name: str) -> str:
    """``auto``/empty → ``splice`` or ``asyncio`` (by the fast path); others checked."""
    name = (name or "auto").strip().lower()
    if name not in RELAYS:
        raise ComponentError(f"unknown userspace relay {name!r}; want {', '.join(RELAYS)}")
    if name == "auto":
        return "splice" if fastpath.COMPILED else "asyncio"
    return name


def new_relay(name: str, dial_timeouts: Sequence[float] | None = None) -> OwnedRelay:
    """A started relay for ``name`` (see :func:`resolve_relay`); the caller closes it.

    ``dial_timeouts`` is the retry schedule of the connections a splice relay
    accepts and dials itself (upstream's by default).
    """
    chosen = resolve_relay(name)
    if chosen == "asyncio":
        return AsyncioRelay()
    if not fastpath.COMPILED:
        # Asked for explicitly: honour it, but say it is the slow build.
        log.warning("--userspace-relay=splice without the compiled fast path: using the twin")
    if dial_timeouts is None:
        return SpliceRelay()
    return SpliceRelay(dial_timeouts=dial_timeouts)


def new_load_balancer(name: str) -> LoadBalancer:
    name = (name or "rr").strip().lower()
    if name == "rr":
        return RoundRobinLoadBalancer()
    if name == "maglev":
        return MaglevLoadBalancer()
    raise ComponentError(
        f"unknown userspace load balancer {name!r}; want {', '.join(LOAD_BALANCERS)}"
    )
