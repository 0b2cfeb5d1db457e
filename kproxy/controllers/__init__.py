"""Controllers: reconcile loops that turn cluster state into more cluster state.

Owns the registry every controller module adds itself to (:data:`CONTROLLERS`,
:func:`register`), the :class:`Controller` shape the manager runs, the options they
share (:class:`ControllerOptions`) and :class:`SharedInformers`, which hands every
controller the same informer per resource so one list+watch feeds them all.

Invariants:

- A factory only builds: it wires handlers onto shared informers and returns a
  :class:`Controller` (or ``None`` when disabled by its options). Informers start
  after every factory ran, so no handler misses the initial list.
- :meth:`Controller.run` runs until cancelled and waits for the caches itself.
- Controllers talk to cluster state only through :mod:`kproxy.client`; this package
  imports kproxy.client, kproxy.api, kproxy.errors and the stdlib, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy.client.informer import IndexFunc, Informer, RestListerWatcher
from kproxy.client.rest import Resource, RestClient

Clock = Callable[[], float]


class Controller(Protocol):
    """A running controller; ``run`` returns only by cancellation."""

    name: str

    async def run(self) -> None: ...


@dataclass(frozen=True)
class ControllerOptions:
    """Flags of ``kproxy controller-manager`` (upstream kube-controller-manager names)."""

    cluster_cidr: str | None = None  # --cluster-cidr; node IPAM is off without it
    node_cidr_mask_size: int = 24  # --node-cidr-mask-size(-ipv4)
    node_cidr_mask_size_ipv6: int = 64  # --node-cidr-mask-size-ipv6
    node_monitor_grace_period: float = 40.0  # --node-monitor-grace-period
    node_monitor_period: float = 5.0  # --node-monitor-period
    default_toleration_seconds: float = 300.0  # DefaultTolerationSeconds admission
    max_endpoints_per_slice: int = 100  # --max-endpoints-per-slice
    workers: int = 5  # --concurrent-*-syncs
    clock: Clock = time.time
    extra: Mapping[str, Any] = field(default_factory=dict)  # knobs of other controllers


class SharedInformers:
    """One informer per (resource, namespace, selectors), shared by every controller."""

    def __init__(self, client: RestClient, *, resync_period: float | None = None) -> None:
        self.client = client
        self._resync = resync_period
        self._informers: dict[tuple[Resource, str, str, str], Informer] = {}
        self._indexes: dict[int, set[str]] = {}
        self._started = False
        self._running: set[int] = set()

    def get(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        indexers: Mapping[str, IndexFunc] | None = None,
    ) -> Informer:
        key = (resource, namespace or "", label_selector or "", field_selector or "")
        informer = self._informers.get(key)
        if informer is None:
            lw = RestListerWatcher(self.client, resource, namespace, label_selector, field_selector)
            informer = Informer(lw, name=resource.plural, resync_period=self._resync)
            self._informers[key] = informer
            self._indexes[id(informer)] = set()
            if self._started:
                informer.start()
                self._running.add(id(informer))
        known = self._indexes[id(informer)]
        for name, fn in (indexers or {}).items():
            if name not in known:
                informer.cache.add_indexer(name, fn)
                known.add(name)
        return informer

    def all(self) -> list[Informer]:
        return list(self._informers.values())

    def start(self) -> None:
        self._started = True
        for informer in self._informers.values():
            if id(informer) not in self._running:
                informer.start()
                self._running.add(id(informer))

    async def stop(self) -> None:
        for informer in self._informers.values():
            await informer.stop()


@dataclass(frozen=True)
class ControllerContext:
    client: RestClient
    informers: SharedInformers
    options: ControllerOptions


ControllerFactory = Callable[[ControllerContext], "Controller | None"]

# name → factory; modules of this package add themselves at import time.
CONTROLLERS: dict[str, ControllerFactory] = {}


def register(name: str) -> Callable[[ControllerFactory], ControllerFactory]:
    """Decorator: ``@register("endpointslice")`` on a factory of a :class:`Controller`."""

    def add(factory: ControllerFactory) -> ControllerFactory:
        if name in CONTROLLERS and CONTROLLERS[name] is not factory:
            raise ValueError(f"controller {name!r} registered twice")
        CONTROLLERS[name] = factory
        return factory

    return add


__all__ = [
    "CONTROLLERS",
    "Clock",
    "Controller",
    "ControllerContext",
    "ControllerFactory",
    "ControllerOptions",
    "SharedInformers",
    "register",
]
