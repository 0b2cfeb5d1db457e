"""The Deployment controller: roll ReplicaSets to a Deployment's template.

Owns :class:`DeploymentController` (registered as ``deployment``): the reconcile that
claims a Deployment's ReplicaSets (:mod:`.ownership`), asks :func:`.rollout.plan_rollout`
what one sync does, applies it (create the new ReplicaSet, write replica counts and
the ``desired-replicas``/``max-replicas`` annotations, bump revisions, delete old
ReplicaSets past ``revisionHistoryLimit``) and writes ``status`` with the conditions
of :mod:`.rollout_status`.

Invariants:

- The new ReplicaSet is named ``<deployment>-<pod-template-hash>`` and carries the
  hash in its labels, selector and template labels, so creating it is idempotent:
  an AlreadyExists for a ReplicaSet we control with the same template is our own
  earlier create; any other is a hash collision, which bumps
  ``status.collisionCount`` and retries (a new hash).
- Every write is a PUT guarded by the resourceVersion the decision was made on; a
  Conflict fails the sync, which the work queue retries on fresh caches.
- A Deployment being deleted only gets its status synced (the garbage collector
  handles its ReplicaSets); a paused one is scaled but not rolled.
- The Deployment's ``deployment.kubernetes.io/revision`` follows its new
  ReplicaSet's revision.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kproxy.api.errors import ApiError
from kproxy.api.selectors import Selector, from_label_selector
from kproxy.client.errors import AlreadyExists, NotFound
from kproxy.client.informer import NAMESPACE_INDEX, Informer, object_key, wait_for_cache_sync
from kproxy.client.rest import DEPLOYMENTS, PODS, REPLICASETS, RestClient
from kproxy.controllers import Controller, ControllerContext, SharedInformers, register
from kproxy.controllers.ownership import (
    CONTROLLER_UID_INDEX,
    apply_claim,
    controller_ref,
    controller_ref_to,
    controller_uid_index,
    is_deleting,
    meta,
    name_of,
    namespace_of,
    plan_claim,
    uid_of,
)
from kproxy.controllers.rollout import (
    DESIRED_REPLICAS_ANNOTATION,
    FOUND_NEW_RS,
    HASH_LABEL,
    MAX_REPLICAS_ANNOTATION,
    NEW_RS_AVAILABLE,
    NEW_RS_CREATED,
    REVISION_ANNOTATION,
    TIMED_OUT,
    DeploymentView,
    NewReplicaSet,
    RSView,
    equal_ignore_hash,
    find_new,
    max_surge,
    plan_rollout,
    time_field,
)
from kproxy.controllers.rollout_status import (
    calculate_status,
    get_condition,
    paused_conditions,
    set_condition,
)
from kproxy.controllers.workqueue import WorkQueue, run_workers
from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Clock = Callable[[], float]


class HashCollision(KProxyError):
    """A ReplicaSet we do not own holds the new ReplicaSet's name."""


class DeploymentController:
    name = "deployment"

    def __init__(
        self,
        client: RestClient,
        informers: SharedInformers,
        *,
        workers: int = 5,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self.clock = clock
        self.workers = workers
        index = {CONTROLLER_UID_INDEX: controller_uid_index}
        self.d_informer: Informer = informers.get(DEPLOYMENTS)
        self.rs_informer: Informer = informers.get(REPLICASETS, indexers=index)
        self.pod_informer: Informer = informers.get(PODS, indexers=index)
        self.queue = WorkQueue(self.name)
        self.d_informer.add_handler(_Handler(self._on_deployment))
        self.rs_informer.add_handler(_Handler(self._on_rs))
        self.pod_informer.add_handler(_Handler(self._on_pod, adds=False))

    async def run(self) -> None:
        await wait_for_cache_sync(self.d_informer, self.rs_informer, self.pod_informer)
        try:
            await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)
        finally:
            self.queue.shutdown()

    # ---------------------------------------------------------------- events

    def _on_deployment(self, old: Obj | None, new: Obj) -> None:
        self.queue.add(object_key(new))

    def _on_rs(self, old: Obj | None, new: Obj) -> None:
        if old is not None and meta(old).get("resourceVersion") == meta(new).get("resourceVersion"):
            return  # a resync
        owners = {self._deployment_of(obj) for obj in (old, new) if obj is not None}
        for key in owners - {None}:
            assert key is not None
            self.queue.add(key)
        if controller_ref(new) is None:
            # An orphan: whoever selects it may adopt it.
            for d in self.d_informer.cache.by_index(NAMESPACE_INDEX, namespace_of(new)):
                selector = _selector(d)
                if selector is not None and not selector.empty and selector.matches_object(new):
                    self.queue.add(object_key(d))

    def _on_pod(self, old: Obj | None, new: Obj) -> None:
        # Only Recreate waits on pods: a pod going away may let it continue.
        if old is not None and old is not new:
            return
        ref = controller_ref(new)
        if ref is None or ref.get("kind") != "ReplicaSet":
            return
        rs = self.rs_informer.cache.get_by_name(namespace_of(new), str(ref.get("name") or ""))
        if rs is not None:
            key = self._deployment_of(rs)
            if key is not None:
                self.queue.add(key)

    def _deployment_of(self, rs: Mapping[str, Any]) -> str | None:
        ref = controller_ref(rs)
        if ref is None or ref.get("kind") != "Deployment":
            return None
        d = self.d_informer.cache.get_by_name(namespace_of(rs), str(ref.get("name") or ""))
        return object_key(d) if d is not None and uid_of(d) == ref.get("uid") else None

    # ------------------------------------------------------------- reconcile

    async def reconcile(self, key: str) -> float | None:
        cached = self.d_informer.cache.get(key)
        if cached is None:
            return None
        d = copy.deepcopy(cached)
        selector = _selector(d)
        if selector is None or selector.empty:
            log.error(
                "deployment %s: invalid or empty selector; selecting all pods is not allowed", key
            )
            return None
        ns = namespace_of(d)
        claim = plan_claim(d, selector, self.rs_informer.cache.by_index(NAMESPACE_INDEX, ns))
        ref = controller_ref_to(d, "apps/v1", "Deployment")
        owned = await apply_claim(self.client, REPLICASETS, d, DEPLOYMENTS, claim, ref)
        rss: dict[str, Obj] = {name_of(rs): copy.deepcopy(rs) for rs in owned}
        view = DeploymentView.of(d)
        now = self.clock()
        conditions = [dict(c) for c in (d.get("status") or {}).get("conditions") or ()]

        if is_deleting(d):
            new = find_new(view, [RSView.of(rs) for rs in rss.values()])
            views = [RSView.of(rs) for rs in rss.values()]
            status = calculate_status(view, views, new, conditions, now, rollout=False)
            await self._write_status(d, status)
            return None

        conditions = paused_conditions(view, conditions, now)
        views = [RSView.of(rs) for rs in rss.values()]
        running = view.recreate and self._old_pods_running(view, rss)
        plan = plan_rollout(view, views, old_pods_running=running)
        new_name = plan.new_rs
        if plan.create is not None:
            created, fresh = await self._create_rs(d, view, plan.create)
            new_name = name_of(created)
            rss[new_name] = created
            if fresh and view.progress_deadline is not None:
                msg = f'Created new replica set "{new_name}"'
                conditions = set_condition(
                    conditions, "Progressing", "True", NEW_RS_CREATED, msg, now
                )
        elif new_name is not None:
            rss[new_name] = await self._sync_new_rs(rss[new_name], plan.revision, view)
            if (
                view.progress_deadline is not None
                and get_condition(conditions, "Progressing") is None
            ):
                msg = f'Found new replica set "{new_name}"'
                conditions = set_condition(
                    conditions, "Progressing", "True", FOUND_NEW_RS, msg, now
                )
        if new_name is not None:
            d = await self._sync_revision(d, plan.revision)

        for name, replicas in plan.scale.items():
            rss[name] = await self._scale_rs(rss[name], replicas, view)
        for name in plan.cleanup:
            log.info("deployment %s: deleting old replica set %s", key, name)
            with contextlib.suppress(NotFound):
                await self.client.delete(
                    REPLICASETS, name, ns, preconditions={"uid": uid_of(rss[name])}
                )
            rss.pop(name, None)

        views = [RSView.of(rs) for rs in rss.values()]
        new_view = RSView.of(rss[new_name]) if new_name is not None else None
        rollout = plan.step != "sync"
        status = calculate_status(view, views, new_view, conditions, now, rollout=rollout)
        await self._write_status(d, status)
        return _requeue_after(view, status, now) if rollout else None

    def _old_pods_running(self, view: DeploymentView, rss: Mapping[str, Obj]) -> bool:
        """``oldPodsRunning``: Recreate starts new pods only once no old pod is left."""
        new = find_new(view, [RSView.of(rs) for rs in rss.values()])
        for name, rs in rss.items():
            if new is not None and name == new.name:
                continue
            if RSView.of(rs).status_replicas > 0:
                return True
            for pod in self.pod_informer.cache.by_index(CONTROLLER_UID_INDEX, uid_of(rs)):
                if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                    return True
        return False

    # ---------------------------------------------------------------- writes

    async def _create_rs(
        self, d: Obj, view: DeploymentView, new: NewReplicaSet
    ) -> tuple[Obj, bool]:
        """Create the new ReplicaSet; (the ReplicaSet, whether this call created it)."""
        ns = namespace_of(d)
        spec = d.get("spec") or {}
        template = copy.deepcopy(spec.get("template") or {})
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = new.hash
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = new.hash
        body: Obj = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": new.name,
                "namespace": ns,
                "labels": dict(template["metadata"]["labels"]),
                "annotations": {
                    REVISION_ANNOTATION: str(new.revision),
                    DESIRED_REPLICAS_ANNOTATION: str(view.replicas),
                    MAX_REPLICAS_ANNOTATION: str(view.replicas + max_surge(view)),
                },
                "ownerReferences": [controller_ref_to(d, "apps/v1", "Deployment")],
            },
            "spec": {
                "replicas": new.replicas,
                "minReadySeconds": view.min_ready_seconds,
                "selector": selector,
                "template": template,
            },
        }
        try:
            created = await self.client.create(REPLICASETS, body, ns)
            log.info("deployment %s/%s: created replica set %s", ns, view.name, new.name)
            return created, True
        except AlreadyExists:
            existing = await self.client.get(REPLICASETS, new.name, ns)
        ref = controller_ref(existing)
        template_of = (existing.get("spec") or {}).get("template") or {}
        if (
            ref is not None
            and ref.get("uid") == uid_of(d)
            and equal_ignore_hash(template_of, spec.get("template") or {})
        ):
            return existing, False
        status = copy.deepcopy(d.get("status") or {})
        status["collisionCount"] = (view.collision_count or 0) + 1
        await self._write_status(d, status)
        raise HashCollision(
            f"deployment {ns}/{view.name}: replica set {new.name} exists and is not ours; "
            f"collisionCount is now {status['collisionCount']}"
        )

    async def _sync_new_rs(self, rs: Obj, revision: int, view: DeploymentView) -> Obj:
        annotations = rs.setdefault("metadata", {}).setdefault("annotations", {})
        spec = rs.setdefault("spec", {})
        if (
            annotations.get(REVISION_ANNOTATION) == str(revision)
            and (spec.get("minReadySeconds") or 0) == view.min_ready_seconds
        ):
            return rs
        annotations[REVISION_ANNOTATION] = str(revision)
        spec["minReadySeconds"] = view.min_ready_seconds
        updated: Obj = await self.client.update(REPLICASETS, rs, namespace_of(rs))
        return updated

    async def _sync_revision(self, d: Obj, revision: int) -> Obj:
        annotations = d.setdefault("metadata", {}).setdefault("annotations", {})
        if annotations.get(REVISION_ANNOTATION) == str(revision):
            return d
        annotations[REVISION_ANNOTATION] = str(revision)
        updated: Obj = await self.client.update(DEPLOYMENTS, d, namespace_of(d))
        return updated

    async def _scale_rs(self, rs: Obj, replicas: int, view: DeploymentView) -> Obj:
        rs = copy.deepcopy(rs)
        old = (rs.get("spec") or {}).get("replicas")
        rs.setdefault("spec", {})["replicas"] = replicas
        annotations = rs.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[DESIRED_REPLICAS_ANNOTATION] = str(view.replicas)
        annotations[MAX_REPLICAS_ANNOTATION] = str(view.replicas + max_surge(view))
        if old != replicas:
            log.info(
                "deployment %s: scaled replica set %s from %s to %d",
                view.name,
                name_of(rs),
                old,
                replicas,
            )
        updated: Obj = await self.client.update(REPLICASETS, rs, namespace_of(rs))
        return updated

    async def _write_status(self, d: Obj, status: Obj) -> None:
        if status == d.get("status"):
            return
        body = copy.deepcopy(d)
        body["status"] = status
        with contextlib.suppress(NotFound):
            await self.client.update(DEPLOYMENTS, body, namespace_of(d), subresource="status")


def _requeue_after(view: DeploymentView, status: Mapping[str, Any], now: float) -> float | None:
    """``requeueStuckDeployment``: look again when the progress deadline would pass."""
    if view.progress_deadline is None:
        return None
    cond = get_condition(status.get("conditions") or (), "Progressing")
    if cond is None or cond.get("reason") in (NEW_RS_AVAILABLE, TIMED_OUT):
        return None
    after = time_field(cond.get("lastUpdateTime")) + view.progress_deadline - now
    return max(after, 0.0) + 1.0


def _selector(d: Mapping[str, Any]) -> Selector | None:
    try:
        return from_label_selector((d.get("spec") or {}).get("selector"))
    except ApiError:
        return None


class _Handler:
    """Informer handler over one ``(old, new)`` callback (``old`` is None on add;
    deletes arrive as ``(obj, obj)``)."""

    def __init__(self, fn: Callable[[Obj | None, Obj], None], *, adds: bool = True) -> None:
        self.fn = fn
        self.adds = adds

    def on_add(self, obj: Obj) -> None:
        if self.adds:
            self.fn(None, obj)

    def on_update(self, old: Obj, new: Obj) -> None:
        self.fn(old, new)

    def on_delete(self, obj: Obj) -> None:
        self.fn(obj, obj)


@register("deployment")
def _factory(ctx: ControllerContext) -> Controller:
    return DeploymentController(
        ctx.client, ctx.informers, workers=ctx.options.workers, clock=ctx.options.clock
    )
