"""The ReplicaSet controller: keep ``spec.replicas`` pods for each ReplicaSet.

Owns :class:`ReplicaSetController` (registered as ``replicaset``) and its pure parts:
pod readiness/availability, the scale-down order (:func:`pods_to_delete`), the pod a
ReplicaSet creates (:func:`pod_from_template`) and its status
(:func:`calculate_status`).

Per ReplicaSet, as upstream's ``syncReplicaSet``: take the active pods of its
namespace (not Succeeded/Failed, not being deleted), claim them (keep the ones it
controls that match, adopt matching orphans, release non-matching ones; see
:mod:`.ownership`), create or delete the difference, then write ``status``
(replicas, fullyLabeledReplicas, readyReplicas, availableReplicas with
``minReadySeconds``, observedGeneration, a ReplicaFailure condition on errors).

Invariants:

- Pods are created with ``generateName: <rs>-`` and a controller reference
  (``controller``, ``blockOwnerDeletion``); the ``/scale`` subresource is the
  apiserver's, the controller only follows ``spec.replicas``.
- Expectations: after creating or deleting pods the ReplicaSet is not managed again
  until the informer has shown those creations/deletions (or ``expectations_ttl``
  passed), so a lagging cache never doubles a scale-up.
- Creation goes in slow-start batches (1, 2, 4, ...) and stops at the first failing
  batch, at most ``burst_replicas`` per sync.
- Scale-down order (upstream's ``ActivePodsWithRanks``, simplified): unassigned
  before assigned; Pending before Unknown before Running; not ready before ready;
  lower ``controller.kubernetes.io/pod-deletion-cost`` first; more pods of the same
  workload on the same node first; ready for less time first; more restarts first;
  newer first; then by name. Upstream compares ready and creation times in
  log2 buckets and breaks ties by UID; here times compare exactly.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.api.errors import ApiError
from kproxy.api.selectors import Selector, from_label_selector, from_set
from kproxy.client.errors import ApiStatusError, ClientError, NotFound
from kproxy.client.informer import NAMESPACE_INDEX, Informer, object_key, wait_for_cache_sync
from kproxy.client.rest import PODS, REPLICASETS, RestClient
from kproxy.controllers import (
    Controller,
    ControllerContext,
    SharedInformers,
    register,
)
from kproxy.controllers.ownership import (
    CONTROLLER_UID_INDEX,
    Claim,
    apply_claim,
    controller_ref,
    controller_ref_to,
    controller_uid_index,
    is_deleting,
    meta,
    namespace_of,
    plan_claim,
    uid_of,
)
from kproxy.controllers.rollout import int_field, time_field
from kproxy.controllers.rollout_status import now_text
from kproxy.controllers.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Clock = Callable[[], float]

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
_PHASE_ORDER = {"Pending": 0, "Unknown": 1, "Running": 2}


# ------------------------------------------------------------------- pods


def is_pod_active(pod: Mapping[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not is_deleting(pod)


def _ready_condition(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond
    return None


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    cond = _ready_condition(pod)
    return cond is not None and cond.get("status") == "True"


def ready_since(pod: Mapping[str, Any]) -> float:
    """When the pod became ready (0 when not ready or unknown)."""
    cond = _ready_condition(pod)
    if cond is None or cond.get("status") != "True":
        return 0.0
    return time_field(cond.get("lastTransitionTime"))


def is_pod_available(pod: Mapping[str, Any], min_ready_seconds: int, now: float) -> bool:
    if not is_pod_ready(pod):
        return False
    if min_ready_seconds <= 0:
        return True
    since = ready_since(pod)
    return since > 0 and since + min_ready_seconds < now


def _node(pod: Mapping[str, Any]) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


def _restarts(pod: Mapping[str, Any]) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or ()
    return max(
        (int_field(s.get("restartCount")) for s in statuses if isinstance(s, Mapping)), default=0
    )


def deletion_rank(pod: Mapping[str, Any], same_node: int) -> tuple[Any, ...]:
    """Sort key: the pod to delete first sorts first (see the module docstring)."""
    ready = is_pod_ready(pod)
    since = ready_since(pod) if ready else 0.0
    created = time_field(meta(pod).get("creationTimestamp"))
    cost = int_field((meta(pod).get("annotations") or {}).get(DELETION_COST_ANNOTATION))
    return (
        _node(pod) != "",
        _PHASE_ORDER.get(str((pod.get("status") or {}).get("phase") or ""), 0),
        ready,
        cost,
        -same_node,
        (since != 0.0, -since) if ready else (False, 0.0),
        -_restarts(pod),
        (created != 0.0, -created),
        str(meta(pod).get("name") or ""),
    )


def pods_to_delete(pods: list[Obj], count: int, related: Iterable[Obj] = ()) -> list[Obj]:
    """The ``count`` pods to delete; ``related`` (pods of the same workload) ranks
    pods that share a node with many others first."""
    if count >= len(pods):
        return list(pods)
    per_node: dict[str, int] = {}
    for pod in related or pods:
        if is_pod_active(pod) and _node(pod):
            per_node[_node(pod)] = per_node.get(_node(pod), 0) + 1
    ranked = sorted(
        pods, key=lambda p: deletion_rank(p, per_node.get(_node(p), 0) if _node(p) else 0)
    )
    return ranked[:count]


def pod_from_template(rs: Mapping[str, Any]) -> Obj:
    """The pod a ReplicaSet creates (``GetPodFromTemplate``)."""
    template = (rs.get("spec") or {}).get("template") or {}
    tmeta = template.get("metadata") or {}
    pod_meta: Obj = {
        "generateName": f"{meta(rs).get('name')}-",
        "namespace": namespace_of(rs),
        "ownerReferences": [controller_ref_to(rs, "apps/v1", "ReplicaSet")],
    }
    for key in ("labels", "annotations", "finalizers"):
        if tmeta.get(key):
            pod_meta[key] = copy.deepcopy(tmeta[key])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": pod_meta,
        "spec": copy.deepcopy(template.get("spec") or {}),
    }


def calculate_status(
    rs: Mapping[str, Any], pods: list[Obj], now: float, failure: tuple[str, str] | None = None
) -> Obj:
    """The next ``status`` of ``rs`` given its active pods (and a manage failure)."""
    spec = rs.get("spec") or {}
    min_ready = int_field(spec.get("minReadySeconds"))
    template_labels = from_set(((spec.get("template") or {}).get("metadata") or {}).get("labels"))
    status: Obj = copy.deepcopy(dict(rs.get("status") or {}))
    status.update(
        replicas=len(pods),
        fullyLabeledReplicas=sum(1 for p in pods if template_labels.matches_object(p)),
        readyReplicas=sum(1 for p in pods if is_pod_ready(p)),
        availableReplicas=sum(1 for p in pods if is_pod_available(p, min_ready, now)),
        observedGeneration=int_field(meta(rs).get("generation")),
    )
    conditions = [c for c in status.get("conditions") or () if isinstance(c, Mapping)]
    has_failure = any(c.get("type") == "ReplicaFailure" for c in conditions)
    if failure is not None and not has_failure:
        conditions.append(
            {
                "type": "ReplicaFailure",
                "status": "True",
                "lastTransitionTime": now_text(now),
                "reason": failure[0],
                "message": failure[1],
            }
        )
    elif failure is None and has_failure:
        conditions = [c for c in conditions if c.get("type") != "ReplicaFailure"]
    if conditions:
        status["conditions"] = conditions
    else:
        status.pop("conditions", None)
    return status


# ------------------------------------------------------------ expectations


@dataclass
class _Expectation:
    adds: int = 0
    deletes: set[str] = field(default_factory=set)
    stamp: float = 0.0


class Expectations:
    """Creations and deletions a ReplicaSet waits to see in the pod informer."""

    def __init__(self, ttl: float = 300.0, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._by_key: dict[str, _Expectation] = {}

    def expect(self, key: str, adds: int = 0, deletes: Iterable[str] = ()) -> None:
        self._by_key[key] = _Expectation(adds, set(deletes), self._clock())

    def created(self, key: str) -> None:
        exp = self._by_key.get(key)
        if exp is not None:
            exp.adds -= 1

    def deleted(self, key: str, pod_key: str) -> None:
        exp = self._by_key.get(key)
        if exp is not None:
            exp.deletes.discard(pod_key)

    def satisfied(self, key: str) -> bool:
        exp = self._by_key.get(key)
        if exp is None:
            return True
        return (exp.adds <= 0 and not exp.deletes) or self._clock() - exp.stamp > self.ttl

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)


# -------------------------------------------------------------- controller


class ReplicaSetController:
    name = "replicaset"

    def __init__(
        self,
        client: RestClient,
        informers: SharedInformers,
        *,
        workers: int = 5,
        clock: Clock = time.time,
        burst_replicas: int = 500,
        expectations_ttl: float = 300.0,
    ) -> None:
        self.client = client
        self.clock = clock
        self.workers = workers
        self.burst_replicas = burst_replicas
        self.expectations = Expectations(expectations_ttl)
        index = {CONTROLLER_UID_INDEX: controller_uid_index}
        self.rs_informer: Informer = informers.get(REPLICASETS, indexers=index)
        self.pod_informer: Informer = informers.get(PODS, indexers=index)
        self.queue = WorkQueue(self.name)
        self.rs_informer.add_handler(self._RSHandler(self))
        self.pod_informer.add_handler(self._PodHandler(self))

    async def run(self) -> None:
        await wait_for_cache_sync(self.rs_informer, self.pod_informer)
        try:
            await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)
        finally:
            self.queue.shutdown()

    # ---------------------------------------------------------------- events

    class _RSHandler:
        def __init__(self, c: ReplicaSetController) -> None:
            self.c = c

        def on_add(self, obj: Obj) -> None:
            self.c.queue.add(object_key(obj))

        def on_update(self, old: Obj, new: Obj) -> None:
            self.c.queue.add(object_key(new))

        def on_delete(self, obj: Obj) -> None:
            self.c.expectations.forget(object_key(obj))
            self.c.queue.add(object_key(obj))

    class _PodHandler:
        def __init__(self, c: ReplicaSetController) -> None:
            self.c = c

        def on_add(self, pod: Obj) -> None:
            if is_deleting(pod):
                self.on_delete(pod)
                return
            rs = self.c._controller_of(pod)
            if rs is not None:
                self.c.expectations.created(object_key(rs))
                self.c.queue.add(object_key(rs))
            elif controller_ref(pod) is None:
                self.c._enqueue_matching(pod)

        def on_update(self, old: Obj, new: Obj) -> None:
            if meta(old).get("resourceVersion") == meta(new).get("resourceVersion"):
                return  # a resync: nothing changed
            old_rs, new_rs = self.c._controller_of(old), self.c._controller_of(new)
            if is_deleting(new) and not is_deleting(old) and new_rs is not None:
                # A graceful delete: count it now, the final DELETED may come much later.
                self.c.expectations.deleted(object_key(new_rs), object_key(new))
            if old_rs is not None and (new_rs is None or uid_of(old_rs) != uid_of(new_rs)):
                self.c.queue.add(object_key(old_rs))
            if new_rs is not None:
                key = object_key(new_rs)
                self.c.queue.add(key)
                min_ready = int_field((new_rs.get("spec") or {}).get("minReadySeconds"))
                if min_ready > 0 and is_pod_ready(new) and not is_pod_ready(old):
                    # Look again once the pod has been ready long enough to count.
                    self.c.queue.add_after(key, min_ready + 0.5)
            elif controller_ref(new) is None:
                self.c._enqueue_matching(new)

        def on_delete(self, pod: Obj) -> None:
            rs = self.c._controller_of(pod)
            if rs is not None:
                self.c.expectations.deleted(object_key(rs), object_key(pod))
                self.c.queue.add(object_key(rs))

    def _controller_of(self, pod: Mapping[str, Any]) -> Obj | None:
        ref = controller_ref(pod)
        if ref is None or ref.get("kind") != "ReplicaSet":
            return None
        rs = self.rs_informer.cache.get_by_name(namespace_of(pod), str(ref.get("name") or ""))
        return rs if rs is not None and uid_of(rs) == ref.get("uid") else None

    def _enqueue_matching(self, pod: Obj) -> None:
        for rs in self.rs_informer.cache.by_index(NAMESPACE_INDEX, namespace_of(pod)):
            selector = _selector(rs)
            if selector is not None and selector.matches_object(pod):
                self.queue.add(object_key(rs))

    # ------------------------------------------------------------- reconcile

    async def reconcile(self, key: str) -> float | None:
        cached = self.rs_informer.cache.get(key)
        if cached is None:
            self.expectations.forget(key)
            return None
        rs = copy.deepcopy(cached)
        selector = _selector(rs)
        if selector is None or selector.empty:
            log.error("replicaset %s: invalid or empty selector; not managing its pods", key)
            return None
        ns = namespace_of(rs)
        active = [
            p for p in self.pod_informer.cache.by_index(NAMESPACE_INDEX, ns) if is_pod_active(p)
        ]
        claim: Claim = plan_claim(rs, selector, active)
        ref = controller_ref_to(rs, "apps/v1", "ReplicaSet")
        pods = await apply_claim(self.client, PODS, rs, REPLICASETS, claim, ref)

        failure: tuple[str, str] | None = None
        if self.expectations.satisfied(key) and not is_deleting(rs):
            try:
                await self._manage(key, rs, pods)
            except ClientError as exc:
                diff = len(pods) - int_field((rs.get("spec") or {}).get("replicas"), 1)
                failure = ("FailedCreate" if diff < 0 else "FailedDelete", str(exc))
        status = calculate_status(rs, pods, self.clock(), failure)
        if status != rs.get("status"):
            rs["status"] = status
            try:
                await self.client.update(REPLICASETS, rs, ns, subresource="status")
            except NotFound:
                return None
        if failure is not None:
            raise ClientError(f"replicaset {key}: {failure[1]}")
        replicas = int_field((rs.get("spec") or {}).get("replicas"), 1)
        min_ready = int_field((rs.get("spec") or {}).get("minReadySeconds"))
        if min_ready > 0 and status["readyReplicas"] == replicas != status["availableReplicas"]:
            return float(min_ready)
        return None

    async def _manage(self, key: str, rs: Obj, pods: list[Obj]) -> None:
        want = int_field((rs.get("spec") or {}).get("replicas"), 1)
        diff = len(pods) - want
        if diff < 0:
            await self._create(key, rs, min(-diff, self.burst_replicas))
        elif diff > 0:
            victims = pods_to_delete(pods, min(diff, self.burst_replicas), self._related(rs))
            await self._delete(key, victims)

    async def _create(self, key: str, rs: Obj, count: int) -> None:
        self.expectations.expect(key, adds=count)
        ns = namespace_of(rs)
        tried, ok, batch = 0, 0, 1
        error: ClientError | None = None
        while tried < count and error is None:
            size = min(batch, count - tried)
            results = await asyncio.gather(
                *(self.client.create(PODS, pod_from_template(rs), ns) for _ in range(size)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, ClientError):
                    error = error or result
                elif isinstance(result, BaseException):
                    raise result
                else:
                    ok += 1
            tried += size
            batch *= 2
        for _ in range(count - ok):
            self.expectations.created(key)  # failed or skipped: never coming
        log.info("replicaset %s: created %d of %d pods", key, ok, count)
        if error is not None:
            raise error

    async def _delete(self, key: str, victims: list[Obj]) -> None:
        self.expectations.expect(key, deletes=[object_key(p) for p in victims])
        ns = victims[0]["metadata"]["namespace"] if victims else ""
        results = await asyncio.gather(
            *(self.client.delete(PODS, p["metadata"]["name"], ns) for p in victims),
            return_exceptions=True,
        )
        error: ClientError | None = None
        for pod, result in zip(victims, results, strict=True):
            if isinstance(result, ApiStatusError | ClientError):
                self.expectations.deleted(key, object_key(pod))
                if not isinstance(result, NotFound):
                    error = error or result
            elif isinstance(result, BaseException):
                raise result
        log.info("replicaset %s: deleting %d pods", key, len(victims))
        if error is not None:
            raise error

    def _related(self, rs: Obj) -> list[Obj]:
        """Active pods of every ReplicaSet with the same controller (or of ``rs``)."""
        ref = controller_ref(rs)
        siblings = (
            self.rs_informer.cache.by_index(CONTROLLER_UID_INDEX, str(ref.get("uid")))
            if ref is not None
            else [rs]
        )
        pods: list[Obj] = []
        for sib in siblings:
            pods.extend(self.pod_informer.cache.by_index(CONTROLLER_UID_INDEX, uid_of(sib)))
        return [p for p in pods if is_pod_active(p)]


def _selector(rs: Mapping[str, Any]) -> Selector | None:
    try:
        return from_label_selector((rs.get("spec") or {}).get("selector"))
    except ApiError:
        return None


@register("replicaset")
def _factory(ctx: ControllerContext) -> Controller:
    return ReplicaSetController(
        ctx.client, ctx.informers, workers=ctx.options.workers, clock=ctx.options.clock
    )
