"""kproxy's REST client, run on a thread that lives inside the hub namespace.

Owns :class:`ApiThread` (plain get/list/create/patch/delete verbs over
:class:`~kproxy.client.rest.RestClient`) and :class:`Watch`. The apiserver listens on
an address that exists only inside the cluster's namespaces, and a network namespace
is per thread (``setns(2)``), so the client's event loop runs on a thread that has
joined the hub; the caller's own threads stay in their namespace.

Invariants: the thread joins the hub before its loop runs anything; every call
through :meth:`ApiThread.run` has a timeout; :meth:`ApiThread.close` stops the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kproxy.client.errors import NotFound
from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import Resource, RestClient, WatchEvent
from kproxy.kernel.podnet import enter_netns
from kproxy.localcluster.errors import ClusterError

__all__ = ["ApiThread", "Obj", "Watch"]

T = TypeVar("T")
Obj = dict[str, Any]


class ApiThread:
    """kproxy's REST client on an event loop whose thread lives in namespace ``hub_ns``."""

    def __init__(self, hub_ns: str, kubeconfig: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(hub_ns,), name="cluster-api", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise ClusterError(f"API client thread did not start: {self._error!r}")
        self.client = RestClient(load_kubeconfig(str(kubeconfig)), request_timeout=15)

    def _main(self, hub_ns: str) -> None:
        try:
            enter_netns(hub_ns)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    # Plain verbs; ``namespace`` defaults to "default" for namespaced resources.
    def get(self, res: Resource, name: str, namespace: str = "default") -> Obj | None:
        try:
            return self.run(self.client.get(res, name, namespace))
        except NotFound:
            return None

    def list(
        self, res: Resource, namespace: str | None = "default", label_selector: str | None = None
    ) -> list[Obj]:
        out = self.run(self.client.list_all(res, namespace, label_selector=label_selector))
        return list(out.get("items") or [])

    def create(self, res: Resource, body: Mapping[str, Any], namespace: str = "default") -> Obj:
        return self.run(self.client.create(res, body, namespace))

    def patch(
        self, res: Resource, name: str, patch: Mapping[str, Any], namespace: str = "default"
    ) -> Obj:
        return self.run(self.client.patch(res, name, patch, namespace, patch_type="merge"))

    def delete(self, res: Resource, name: str, namespace: str = "default") -> None:
        with contextlib.suppress(NotFound):
            self.run(self.client.delete(res, name, namespace))

    def watch(
        self,
        res: Resource,
        on_event: Callable[[WatchEvent], None],
        namespace: str | None = "default",
        label_selector: str | None = None,
    ) -> Watch:
        """Call ``on_event`` (on the loop thread) for every event after a fresh list; the
        list's items arrive first as synthetic ADDED events."""
        return Watch(self, res, on_event, namespace, label_selector)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.close(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Watch:
    """A running watch (see :meth:`ApiThread.watch`); :meth:`stop` ends it."""

    def __init__(
        self,
        api: ApiThread,
        res: Resource,
        on_event: Callable[[WatchEvent], None],
        namespace: str | None,
        label_selector: str | None,
    ) -> None:
        self.errors: list[BaseException] = []
        self._started = threading.Event()

        async def main() -> None:
            try:
                listed = await api.client.list_all(res, namespace, label_selector=label_selector)
                for item in listed.get("items") or ():
                    on_event(WatchEvent("ADDED", item))
                rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
                self._started.set()
                while True:  # the server ends a watch now and then; resume where it was
                    async for ev in api.client.watch(
                        res, namespace, resource_version=rv, label_selector=label_selector
                    ):
                        rv = ev.resource_version or rv
                        if ev.type != "BOOKMARK":
                            on_event(ev)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # reported to the caller through .errors
                self.errors.append(exc)
                self._started.set()

        self._future = asyncio.run_coroutine_threadsafe(main(), api.loop)
        if not self._started.wait(15):
            self.stop()
            raise ClusterError("the watch did not start")
        if self.errors:
            raise ClusterError(f"the watch failed: {self.errors[0]!r}")

    def stop(self) -> None:
        self._future.cancel()
