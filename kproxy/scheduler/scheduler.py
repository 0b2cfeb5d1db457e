"""The scheduler loop: pending pods → a decision → ``pods/binding``; events on failure.

Owns :class:`Scheduler` and :func:`run_scheduler` (the ``kproxy scheduler`` entry point).

The loop (upstream's ``scheduleOne``, one pod at a time):

1. Informers on pods (non-terminal), nodes and namespaces. A pod is ours when
   ``spec.nodeName`` is empty, ``spec.schedulerName`` is ours (default
   ``default-scheduler``) and it is not being deleted.
2. Each cycle builds a :class:`~.nodeinfo.Snapshot` from the caches plus the pods this
   scheduler bound whose binding the cache has not shown yet ("assumed" pods, so two
   quick cycles cannot both fill the same room), and asks :func:`~.framework.schedule`.
3. A fit is bound by ``POST …/pods/{name}/binding`` and gets a ``Scheduled`` event.
   No fit: a ``FailedScheduling`` Warning event with upstream's message, the pod's
   ``PodScheduled=False`` condition (reason ``Unschedulable``), and the pod waits in
   the queue's unschedulable set until a node or bound pod changes (or the flush
   period ends), with per-pod backoff. A bind error other than a 409 backs off.

Invariant: a 409 on bind means someone else decided (bound, deleted or replaced);
the pod is dropped from the queue and the informer tells the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kproxy.api.meta import format_time
from kproxy.client.errors import ApiStatusError, Conflict, NotFound
from kproxy.client.informer import (
    FuncHandler,
    Informer,
    RestListerWatcher,
    object_key,
    wait_for_cache_sync,
)
from kproxy.client.rest import EVENTS, NAMESPACES, NODES, PODS, RestClient
from kproxy.errors import KProxyError
from kproxy.scheduler.filters import node_ready_status
from kproxy.scheduler.framework import Decision, schedule
from kproxy.scheduler.nodeinfo import Snapshot, build_snapshot
from kproxy.scheduler.queue import SchedulingQueue

log = logging.getLogger(__name__)

Obj = dict[str, Any]

DEFAULT_SCHEDULER_NAME = "default-scheduler"
ASSUME_TTL = 30.0  # how long a binding may take to show up in the cache


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def key_of(pod: Mapping[str, Any]) -> str:
    return f"{_meta(pod).get('namespace')}/{_meta(pod).get('name')}"


class Scheduler:
    def __init__(
        self,
        client: RestClient,
        *,
        scheduler_name: str = DEFAULT_SCHEDULER_NAME,
        seed: int | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 10.0,
        max_unschedulable: float = 300.0,
        flush_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.name = scheduler_name
        self.rng = random.Random(seed)
        self.clock = clock
        self.flush_interval = flush_interval
        self.queue = SchedulingQueue(
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            max_unschedulable=max_unschedulable,
        )
        self.pods = Informer(
            RestListerWatcher(
                client, PODS, field_selector="status.phase!=Succeeded,status.phase!=Failed"
            ),
            name="scheduler-pods",
        )
        self.nodes = Informer(RestListerWatcher(client, NODES), name="scheduler-nodes")
        self.namespaces = Informer(
            RestListerWatcher(client, NAMESPACES), name="scheduler-namespaces"
        )
        self._assumed: dict[str, tuple[Obj, float]] = {}  # key → (bound copy, deadline)
        self.pods.add_handler(
            FuncHandler(add=self._pod_added, update=self._pod_updated, delete=self._pod_deleted)
        )
        self.nodes.add_handler(
            FuncHandler(add=lambda _n: self.queue.move_all(), update=self._node_updated)
        )

    # ---------------------------------------------------------------- events

    def is_pending(self, pod: Mapping[str, Any]) -> bool:
        spec = _spec(pod)
        return (
            not spec.get("nodeName")
            and (spec.get("schedulerName") or DEFAULT_SCHEDULER_NAME) == self.name
            and not _meta(pod).get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        )

    def _pod_added(self, pod: Obj) -> None:
        key = object_key(pod)
        if self.is_pending(pod):
            self.queue.add(key)
        elif _spec(pod).get("nodeName"):
            self._assumed.pop(key, None)
            self.queue.move_all()  # a new neighbour may satisfy someone's pod affinity

    def _pod_updated(self, old: Obj, new: Obj) -> None:
        key = object_key(new)
        if self.is_pending(new):
            # Status-only writes (ours included) change nothing a filter looks at.
            if (_meta(old).get("labels"), _spec(old)) != (_meta(new).get("labels"), _spec(new)):
                self.queue.add(key)
            return
        self.queue.forget(key)
        if _spec(new).get("nodeName"):
            self._assumed.pop(key, None)
            if _meta(new).get("labels") != _meta(old).get("labels"):
                self.queue.move_all()

    def _pod_deleted(self, pod: Obj) -> None:
        key = object_key(pod)
        self.queue.forget(key)
        self._assumed.pop(key, None)
        if _spec(pod).get("nodeName"):
            self.queue.move_all()  # its room is free

    def _node_updated(self, old: Obj, new: Obj) -> None:
        def shape(n: Obj) -> tuple[Any, ...]:
            status = n.get("status") or {}
            return (
                _meta(n).get("labels"),
                n.get("spec"),
                status.get("allocatable"),
                node_ready_status(n),
            )

        if shape(old) != shape(new):
            self.queue.move_all()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        informers = (self.pods, self.nodes, self.namespaces)
        for informer in informers:
            informer.start()
        flusher: asyncio.Task[None] | None = None
        try:
            await wait_for_cache_sync(*informers)
            log.info("scheduler %s: caches synced", self.name)
            flusher = asyncio.create_task(self._flush_loop(), name="scheduler-flush")
            while True:
                key = await self.queue.pop()
                if key is None:
                    return
                try:
                    await self.schedule_one(key)
                except Exception as exc:
                    log.warning(
                        "scheduler: cycle for %s failed: %s",
                        key,
                        exc,
                        exc_info=not isinstance(exc, KProxyError),
                    )
                    self.queue.retry(key)
                finally:
                    self.queue.done(key)
        finally:
            self.queue.close()
            if flusher is not None:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
            for informer in informers:
                await informer.stop()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.queue.flush()

    def snapshot(self) -> Snapshot:
        now = self.clock()
        self._assumed = {k: v for k, v in self._assumed.items() if v[1] > now}
        pods: dict[str, Mapping[str, Any]] = {object_key(p): p for p in self.pods.cache.list()}
        for key, (bound, _) in self._assumed.items():
            if key in pods and not _spec(pods[key]).get("nodeName"):
                pods[key] = bound
        return build_snapshot(self.nodes.cache.list(), pods.values(), self.namespaces.cache.list())

    async def schedule_one(self, key: str) -> Decision | None:
        pod = self.pods.cache.get(key)
        if pod is None or not self.is_pending(pod) or key in self._assumed:
            self.queue.forget(key)
            return None
        decision = schedule(pod, self.snapshot(), self.rng)
        if decision.node is None:
            message = decision.message
            log.info("scheduler: %s unschedulable: %s", key, message)
            self.queue.park(key)
            await self._event(pod, "Warning", "FailedScheduling", message)
            await self._mark_unschedulable(pod, message)
            return decision
        bound = {**pod, "spec": {**_spec(pod), "nodeName": decision.node}}
        self._assumed[key] = (bound, self.clock() + ASSUME_TTL)
        try:
            await self.bind(pod, decision.node)
        except (Conflict, NotFound) as exc:
            log.info("scheduler: binding %s: %s; leaving it to the informer", key, exc)
            self._assumed.pop(key, None)
            self.queue.forget(key)
            return decision
        except Exception:
            self._assumed.pop(key, None)
            raise
        self.queue.forget(key)
        meta = _meta(pod)
        await self._event(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {meta.get('namespace')}/{meta.get('name')} to {decision.node}",
        )
        log.info("scheduler: bound %s to %s", key, decision.node)
        return decision

    async def bind(self, pod: Mapping[str, Any], node: str) -> None:
        meta = _meta(pod)
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        if meta.get("uid"):
            body["metadata"]["uid"] = meta["uid"]
        await self.client.create(
            PODS,
            body,
            str(meta.get("namespace")),
            name=str(meta.get("name")),
            subresource="binding",
        )

    def _now_text(self) -> str:
        return format_time(datetime.fromtimestamp(self.clock(), UTC))

    async def _event(self, pod: Mapping[str, Any], etype: str, reason: str, message: str) -> None:
        meta = _meta(pod)
        now = self._now_text()
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": etype,
            "source": {"component": self.name},
            "reportingComponent": self.name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENTS, event, str(meta.get("namespace")))
        except KProxyError as exc:
            # Events are best effort: losing one must not stop scheduling.
            log.warning("scheduler: no %s event for %s: %s", reason, key_of(pod), exc)

    async def _mark_unschedulable(self, pod: Mapping[str, Any], message: str) -> None:
        current: Mapping[str, Any] = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or ()
                if c.get("type") == "PodScheduled"
            ),
            {},
        )
        if (current.get("status"), current.get("reason"), current.get("message")) == (
            "False",
            "Unschedulable",
            message,
        ):
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": self._now_text(),
        }
        meta = _meta(pod)
        try:
            await self.client.patch(
                PODS,
                str(meta.get("name")),
                {"status": {"conditions": [condition]}},
                str(meta.get("namespace")),
                subresource="status",
            )
        except ApiStatusError as exc:
            # Best effort, like the event: the pod stays queued either way.
            log.warning("scheduler: could not set PodScheduled on %s: %s", key_of(pod), exc)


async def run_scheduler(
    client: RestClient,
    *,
    scheduler_name: str = DEFAULT_SCHEDULER_NAME,
    seed: int | None = None,
    initial_backoff: float = 1.0,
    max_backoff: float = 10.0,
    max_unschedulable: float = 300.0,
    flush_interval: float = 30.0,
    started: asyncio.Event | None = None,
) -> None:
    """Schedule pods until cancelled (``started`` is set once the loop is wired)."""
    scheduler = Scheduler(
        client,
        scheduler_name=scheduler_name,
        seed=seed,
        initial_backoff=initial_backoff,
        max_backoff=max_backoff,
        max_unschedulable=max_unschedulable,
        flush_interval=flush_interval,
    )
    if started is not None:
        started.set()
    await scheduler.run()


__all__ = ["DEFAULT_SCHEDULER_NAME", "Scheduler", "run_scheduler"]
