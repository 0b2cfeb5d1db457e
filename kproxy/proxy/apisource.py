"""The apiserver source: informers on Services, EndpointSlices and the proxy's own Node.

Owns :class:`ApiServerSource` (``--kubeconfig`` / ``--master``), the apiserver
counterpart of :class:`~kproxy.proxy.sources.ObjectsFile`: it delivers the same
:class:`~kproxy.proxy.sources.Handler` events, from three
:class:`~kproxy.client.informer.Informer` s (list, watch, relist on 410, resync
every ``--config-sync-period``):

- Services in all namespaces, label selector
  ``!service.kubernetes.io/service-proxy-name`` (a Service that names another
  proxy is not ours) and field selector ``spec.clusterIP!=None`` (headless
  Services are DNS-only);
- EndpointSlices in all namespaces, label selector
  ``!service.kubernetes.io/headless`` (the slices of headless Services);
- the proxy's Node, field selector ``metadata.name=<node>``.

These are upstream's selectors (``cmd/kube-proxy/app/server.go``, ``Run``: one
informer factory per kind since the ServiceCIDR work; before that one factory
applied both label requirements to both kinds). The filtering is the server's.

Invariants:

- ``handler.synced()`` is called exactly once, after both the Service and the
  EndpointSlice informers have listed once (the Node does not gate it, as
  upstream's ``NodeConfig`` does not gate ``OnServiceSynced``/``OnEndpointSlicesSynced``);
  every event delivered before it is part of that first full set;
- events are ``(old, new)`` pairs (:class:`~kproxy.client.informer.PairHandler`):
  ``(None, obj)`` add, ``(old, new)`` update (``(obj, obj)`` on resync),
  ``(obj, None)`` delete; after a 410 the relist delivers exactly the difference;
- the informers run on the caller's event loop; :meth:`ApiServerSource.run` stops
  them when it ends (cancelled), and never closes the client (the caller owns it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from kproxy.client.informer import Backoff, Informer, Obj, PairHandler, RestListerWatcher
from kproxy.client.rest import ENDPOINTSLICES, NODES, SERVICES, RestClient
from kproxy.errors import KProxyError
from kproxy.proxy.sources import Handler

__all__ = [
    "ENDPOINT_SLICE_LABEL_SELECTOR",
    "SERVICE_FIELD_SELECTOR",
    "SERVICE_LABEL_SELECTOR",
    "ApiServerSource",
]

log = logging.getLogger(__name__)

LABEL_SERVICE_PROXY_NAME: Final = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS: Final = "service.kubernetes.io/headless"

SERVICE_LABEL_SELECTOR: Final = f"!{LABEL_SERVICE_PROXY_NAME}"
SERVICE_FIELD_SELECTOR: Final = "spec.clusterIP!=None"
ENDPOINT_SLICE_LABEL_SELECTOR: Final = f"!{LABEL_HEADLESS}"


class ApiServerSource:
    """Services, EndpointSlices and one Node from an apiserver, as Handler events."""

    def __init__(
        self,
        client: RestClient,
        node_name: str,
        *,
        resync_period: float | None = None,
        backoff: Backoff | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
    ) -> None:
        self.client = client
        self.node_name = node_name
        # 0 disables the resync, as upstream's ConfigSyncPeriod 0.
        period = resync_period or None

        def informer(name: str, lw: RestListerWatcher) -> Informer:
            return Informer(
                lw,
                name=name,
                resync_period=period,
                # One Backoff per informer: they fail and recover independently.
                backoff=Backoff(backoff.initial, backoff.cap, backoff.factor, backoff.jitter)
                if backoff is not None
                else None,
                watch_timeout=watch_timeout,
            )

        self.services = informer(
            "services",
            RestListerWatcher(
                client,
                SERVICES,
                label_selector=SERVICE_LABEL_SELECTOR,
                field_selector=SERVICE_FIELD_SELECTOR,
            ),
        )
        self.endpoint_slices = informer(
            "endpointslices",
            RestListerWatcher(client, ENDPOINTSLICES, label_selector=ENDPOINT_SLICE_LABEL_SELECTOR),
        )
        self.node = informer(
            f"node/{node_name}",
            RestListerWatcher(client, NODES, field_selector=f"metadata.name={node_name}"),
        )
        self._handler: Handler | None = None

    @property
    def informers(self) -> tuple[Informer, Informer, Informer]:
        return self.services, self.endpoint_slices, self.node

    def start(self, handler: Handler) -> None:
        """Register ``handler`` and start listing and watching (idempotent per handler)."""
        if self._handler is handler:
            return
        if self._handler is not None:
            raise KProxyError("ApiServerSource already started with another handler")
        self._handler = handler
        # Handlers before start(): the first list's adds must reach the handler.
        self.services.add_handler(PairHandler(handler.on_service))
        self.endpoint_slices.add_handler(PairHandler(handler.on_endpoint_slice))
        self.node.add_handler(PairHandler(self._on_node))
        for inf in self.informers:
            inf.start()

    def _on_node(self, old: Obj | None, new: Obj | None) -> None:
        assert self._handler is not None
        # The field selector already picks our Node; this guards a server that ignores it.
        obj = new if new is not None else old
        name = ((obj or {}).get("metadata") or {}).get("name")
        if name != self.node_name:
            log.warning("ignoring Node %r: this proxy follows %r", name, self.node_name)
            return
        self._handler.on_node(old, new)

    async def wait_node(self, timeout: float) -> bool:
        """True once the Node informer has listed (the Node may still be absent)."""
        return await self.node.wait_synced(timeout)

    async def run(self, handler: Handler) -> None:
        """Start (if needed), call ``handler.synced()`` once, follow changes until cancelled."""
        self.start(handler)
        try:
            # No timeout: the informers retry with backoff until the apiserver answers,
            # and the proxy must not sync before it has the full set.
            await asyncio.gather(self.services.wait_synced(), self.endpoint_slices.wait_synced())
            log.info(
                "apiserver source synced: %d services, %d endpointslices, node %s %s",
                len(self.services.cache),
                len(self.endpoint_slices.cache),
                self.node_name,
                "found" if len(self.node.cache) else "not found (yet)",
            )
            handler.synced()
            await asyncio.Event().wait()  # follow until cancelled
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop the informers (safe to call more than once)."""
        for inf in self.informers:
            await inf.stop()
