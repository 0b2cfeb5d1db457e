"""Deployment rollout planning (pure): given a Deployment and its ReplicaSets, what next.

Owns the pod-template hash (:func:`compute_hash`, upstream's ``ComputeHash``: FNV-32a
then ``rand.SafeEncodeString``), the maxSurge/maxUnavailable arithmetic
(:func:`scaled_value`, :func:`resolve_fenceposts`), and :func:`plan_rollout`, one sync
of upstream's deployment controller as a decision: the ReplicaSet to create, the
replica counts to write, the old ReplicaSets to delete. :mod:`.deployment` applies it.

Upstream's behaviour kept (``pkg/controller/deployment``):

- The new ReplicaSet is the oldest one whose template equals the Deployment's,
  ignoring the ``pod-template-hash`` label. Its revision is one more than the
  highest old revision unless it already is the highest (so a rollback gets a new
  revision).
- A paused Deployment, or one whose active ReplicaSets carry a
  ``desired-replicas`` annotation other than ``spec.replicas``, is only *scaled*
  (``sync``): the only active (or newest) ReplicaSet takes the whole count; with a
  saturated new ReplicaSet the old ones go to 0; otherwise the difference to
  ``replicas + maxSurge`` is spread proportionally to the ``max-replicas``
  annotations, leftovers to the largest ReplicaSet.
- RollingUpdate: scale the new ReplicaSet up to at most ``replicas + maxSurge``
  pods in total; otherwise scale old ones down (unhealthy replicas first, oldest
  ReplicaSets first) while keeping ``replicas - maxUnavailable`` available. One
  kind of step per sync, as upstream (a step that scaled returns).
- Recreate: old ReplicaSets to 0, wait until their pods are gone, then create or
  scale the new one to ``replicas``.
- Percentages: surge rounds up, unavailable rounds down; both 0 means unavailable 1.
- Old ReplicaSets beyond ``revisionHistoryLimit`` are deleted, lowest revision
  first, only when fully scaled down and observed, once the rollout is complete.

The text uses the JSON of the template instead of upstream's Go struct dump, so
hashes are of the same form but not bit-identical to upstream's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.api.meta import parse_time
from kproxy.errors import KProxyError

Obj = dict[str, Any]

HASH_LABEL = "pod-template-hash"
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
DESIRED_REPLICAS_ANNOTATION = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS_ANNOTATION = "deployment.kubernetes.io/max-replicas"

# Condition reasons (upstream deploymentutil).
NEW_RS_CREATED = "NewReplicaSetCreated"
FOUND_NEW_RS = "FoundNewReplicaSet"
RS_UPDATED = "ReplicaSetUpdated"
NEW_RS_AVAILABLE = "NewReplicaSetAvailable"
TIMED_OUT = "ProgressDeadlineExceeded"
PAUSED = "DeploymentPaused"
RESUMED = "DeploymentResumed"
MIN_AVAILABLE = "MinimumReplicasAvailable"
MIN_UNAVAILABLE = "MinimumReplicasUnavailable"

SAFE_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_NO_DEADLINE = 2**31 - 1  # math.MaxInt32: "no progress deadline"


# ------------------------------------------------------------------- hash


def fnv32a(data: bytes, h: int = _FNV_OFFSET) -> int:
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def safe_encode(text: str) -> str:
    """``rand.SafeEncodeString``: each character mapped onto a vowel-free alphabet."""
    return "".join(SAFE_ALPHANUMS[ord(c) % len(SAFE_ALPHANUMS)] for c in text)


def compute_hash(template: Mapping[str, Any], collision_count: int | None = None) -> str:
    """The ``pod-template-hash`` of a template (and the Deployment's collisionCount)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = fnv32a(text.encode())
    if collision_count is not None:
        # Upstream writes the uint32 little-endian into an 8-byte buffer.
        h = fnv32a((collision_count & 0xFFFFFFFF).to_bytes(4, "little") + b"\0" * 4, h)
    return safe_encode(str(h))


def template_without_hash(template: Mapping[str, Any]) -> Obj:
    out: Obj = json.loads(json.dumps(template))
    labels = (out.get("metadata") or {}).get("labels")
    if isinstance(labels, dict):
        labels.pop(HASH_LABEL, None)
        if not labels:
            del out["metadata"]["labels"]
    if out.get("metadata") == {}:
        del out["metadata"]
    return out


def equal_ignore_hash(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return template_without_hash(a) == template_without_hash(b)


# ------------------------------------------------------------ int-or-percent


def scaled_value(value: Any, total: int, round_up: bool) -> int:
    """``intstr.GetScaledValueFromIntOrPercent``: an int, or ``"N%"`` of ``total``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = int(value[:-1])
        except ValueError:
            raise KProxyError(f"invalid value for IntOrString: {value!r}") from None
        # Exact integer ceil/floor: what upstream's float math gives for these sizes.
        return -(-pct * total // 100) if round_up else pct * total // 100
    raise KProxyError(f"invalid value for IntOrString: {value!r} is not an int or a percentage")


def resolve_fenceposts(max_surge: Any, max_unavailable: Any, desired: int) -> tuple[int, int]:
    surge = scaled_value(0 if max_surge is None else max_surge, desired, True)
    unavailable = scaled_value(0 if max_unavailable is None else max_unavailable, desired, False)
    if surge == 0 and unavailable == 0:
        # Both zero would never make progress: upstream allows one unavailable pod.
        unavailable = 1
    return surge, unavailable


# ------------------------------------------------------------------- views


def int_field(value: Any, default: int = 0) -> int:
    """An integer field as written (int or digits), else ``default``."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _opt_int(value: Any) -> int | None:
    return (
        int_field(value)
        if isinstance(value, int | str) and str(value).lstrip("-").isdigit()
        else None
    )


def time_field(text: Any) -> float:
    """A ``metav1.Time`` field as epoch seconds (0 when absent or malformed)."""
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return 0.0


def _map(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True, slots=True)
class RSView:
    """What the planner needs of one ReplicaSet."""

    name: str
    replicas: int
    template: Mapping[str, Any] = field(default_factory=dict)
    status_replicas: int = 0
    ready: int = 0
    available: int = 0
    revision: int = 0
    created: float = 0.0
    desired: int | None = None
    max_replicas: int | None = None
    deleting: bool = False
    generation: int = 0
    observed_generation: int = 0

    @classmethod
    def of(cls, rs: Mapping[str, Any]) -> RSView:
        meta, spec, status = _map(rs, "metadata"), _map(rs, "spec"), _map(rs, "status")
        ann = _map(meta, "annotations")
        return cls(
            name=str(meta.get("name") or ""),
            replicas=int_field(spec.get("replicas"), 1),
            template=_map(spec, "template"),
            status_replicas=int_field(status.get("replicas")),
            ready=int_field(status.get("readyReplicas")),
            available=int_field(status.get("availableReplicas")),
            revision=int_field(ann.get(REVISION_ANNOTATION)),
            created=time_field(meta.get("creationTimestamp")),
            desired=_opt_int(ann.get(DESIRED_REPLICAS_ANNOTATION)),
            max_replicas=_opt_int(ann.get(MAX_REPLICAS_ANNOTATION)),
            deleting=bool(meta.get("deletionTimestamp")),
            generation=int_field(meta.get("generation")),
            observed_generation=int_field(status.get("observedGeneration")),
        )


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """What the planner needs of the Deployment (``status`` is the current one)."""

    name: str
    replicas: int
    template: Mapping[str, Any] = field(default_factory=dict)
    recreate: bool = False
    max_surge: Any = "25%"
    max_unavailable: Any = "25%"
    paused: bool = False
    revision_history_limit: int | None = 10
    progress_deadline: int | None = 600
    min_ready_seconds: int = 0
    generation: int = 0
    collision_count: int | None = None
    status: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> DeploymentView:
        meta, spec = _map(d, "metadata"), _map(d, "spec")
        strategy = _map(spec, "strategy")
        rolling = _map(strategy, "rollingUpdate")
        deadline = spec.get("progressDeadlineSeconds")
        status = _map(d, "status")
        return cls(
            name=str(meta.get("name") or ""),
            replicas=int_field(spec.get("replicas"), 1),
            template=_map(spec, "template"),
            recreate=strategy.get("type") == "Recreate",
            max_surge=rolling.get("maxSurge", "25%"),
            max_unavailable=rolling.get("maxUnavailable", "25%"),
            paused=spec.get("paused") is True,
            revision_history_limit=_opt_int(spec.get("revisionHistoryLimit")),
            progress_deadline=None if deadline in (None, _NO_DEADLINE) else int_field(deadline),
            min_ready_seconds=int_field(spec.get("minReadySeconds")),
            generation=int_field(meta.get("generation")),
            collision_count=_opt_int(status.get("collisionCount")),
            status=status,
        )


def max_surge(d: DeploymentView) -> int:
    if d.recreate:
        return 0
    return resolve_fenceposts(d.max_surge, d.max_unavailable, d.replicas)[0]


def max_unavailable(d: DeploymentView) -> int:
    if d.recreate or d.replicas == 0:
        return 0
    return min(resolve_fenceposts(d.max_surge, d.max_unavailable, d.replicas)[1], d.replicas)


def by_creation(rs: RSView) -> tuple[float, str]:
    return (rs.created, rs.name)


def find_new(d: DeploymentView, rss: Iterable[RSView]) -> RSView | None:
    """The oldest ReplicaSet whose template is the Deployment's (ignoring the hash)."""
    for rs in sorted(rss, key=by_creation):
        if equal_ignore_hash(rs.template, d.template):
            return rs
    return None


# -------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class NewReplicaSet:
    name: str
    hash: str
    replicas: int
    revision: int


@dataclass
class RolloutPlan:
    step: str = "rolling"  # sync (scale only) | rolling | recreate
    new_rs: str | None = None  # the existing ReplicaSet that matches the template
    create: NewReplicaSet | None = None
    revision: int = 1  # the new ReplicaSet's revision
    scale: dict[str, int] = field(default_factory=dict)  # name → spec.replicas to write
    cleanup: list[str] = field(default_factory=list)  # old ReplicaSets to delete
    waiting: bool = False  # Recreate: old pods still running


class _Planner:
    """Upstream's sync functions over replica counts that change as steps are taken."""

    def __init__(self, d: DeploymentView, rss: list[RSView], plan: RolloutPlan) -> None:
        self.d = d
        self.plan = plan
        self.sizes = {rs.name: rs.replicas for rs in rss}
        self.surge = max_surge(d)

    def size(self, rs: RSView) -> int:
        return self.sizes[rs.name]

    def total(self, rss: Iterable[RSView]) -> int:
        return sum(self.size(rs) for rs in rss)

    def _annotations_stale(self, rs: RSView) -> bool:
        return rs.desired != self.d.replicas or rs.max_replicas != self.d.replicas + self.surge

    def set_size(self, rs: RSView, n: int) -> bool:
        """``scaleReplicaSet``: write when the size or the replica annotations differ."""
        changed = n != self.size(rs)
        if changed or self._annotations_stale(rs):
            self.sizes[rs.name] = n
            self.plan.scale[rs.name] = n
        return changed

    def scale_event(self, rs: RSView, n: int) -> bool:
        """``scaleReplicaSetAndRecordEvent``: nothing to do at the same size."""
        return n != self.size(rs) and self.set_size(rs, n)

    # ---------------------------------------------------------------- sizes

    def new_rs_new_replicas(self, all_rss: list[RSView], new: RSView) -> int:
        if self.d.recreate:
            return self.d.replicas
        max_total = self.d.replicas + self.surge
        current = self.total(all_rss)
        if current >= max_total:
            return self.size(new)
        return self.size(new) + min(max_total - current, self.d.replicas - self.size(new))

    # ------------------------------------------------------------- rolling

    def reconcile_new(self, all_rss: list[RSView], new: RSView) -> bool:
        if self.size(new) == self.d.replicas:
            return False
        if self.size(new) > self.d.replicas:
            return self.scale_event(new, self.d.replicas)
        return self.scale_event(new, self.new_rs_new_replicas(all_rss, new))

    def reconcile_old(self, all_rss: list[RSView], olds: list[RSView], new: RSView) -> bool:
        if self.total(olds) == 0:
            return False
        min_available = self.d.replicas - max_unavailable(self.d)
        new_unavailable = self.size(new) - new.available
        max_scaled_down = self.total(all_rss) - min_available - new_unavailable
        if max_scaled_down <= 0:
            return False
        cleaned = self.cleanup_unhealthy(olds, max_scaled_down)
        scaled = self.scale_down_old(all_rss, olds)
        return cleaned + scaled > 0

    def cleanup_unhealthy(self, olds: list[RSView], max_cleanup: int) -> int:
        total = 0
        for rs in sorted(olds, key=by_creation):
            if total >= max_cleanup:
                break
            unhealthy = self.size(rs) - rs.available
            if self.size(rs) == 0 or unhealthy <= 0:
                continue
            down = min(max_cleanup - total, unhealthy)
            self.scale_event(rs, self.size(rs) - down)
            total += down
        return total

    def scale_down_old(self, all_rss: list[RSView], olds: list[RSView]) -> int:
        min_available = self.d.replicas - max_unavailable(self.d)
        available = sum(rs.available for rs in all_rss)
        if available <= min_available:
            return 0
        budget = available - min_available
        total = 0
        for rs in sorted(olds, key=by_creation):
            if total >= budget:
                break
            if self.size(rs) == 0:
                continue
            down = min(self.size(rs), budget - total)
            self.scale_event(rs, self.size(rs) - down)
            total += down
        return total

    # ------------------------------------------------------ scaling (sync)

    def find_active_or_latest(self, new: RSView | None, olds: list[RSView]) -> RSView | None:
        if new is None and not olds:
            return None
        newest_first = sorted(olds, key=by_creation, reverse=True)
        active = [rs for rs in [*newest_first, new] if rs is not None and self.size(rs) > 0]
        if not active:
            return new if new is not None else newest_first[0]
        return active[0] if len(active) == 1 else None

    def is_saturated(self, new: RSView | None) -> bool:
        return (
            new is not None
            and new.desired is not None
            and self.size(new) == self.d.replicas
            and new.desired == self.d.replicas
            and new.available == self.d.replicas
        )

    def scale(self, new: RSView | None, olds: list[RSView]) -> None:
        target = self.find_active_or_latest(new, olds)
        if target is not None:
            self.set_size(target, self.d.replicas)
            return
        if self.is_saturated(new):
            for rs in olds:
                if self.size(rs) > 0:
                    self.scale_event(rs, 0)
            return
        if self.d.recreate:
            return
        active = [rs for rs in [*olds, new] if rs is not None and self.size(rs) > 0]
        allowed = self.d.replicas + self.surge if self.d.replicas > 0 else 0
        to_add = allowed - self.total(active)
        if to_add > 0:  # largest first, newer first among equals
            active.sort(key=lambda rs: (-self.size(rs), -rs.created, rs.name))
        elif to_add < 0:  # largest first, older first among equals
            active.sort(key=lambda rs: (-self.size(rs), rs.created, rs.name))
        added = 0
        targets: dict[str, int] = {}
        for rs in active:
            part = self.proportion(rs, to_add, added) if to_add else 0
            targets[rs.name] = self.size(rs) + part
            added += part
        for i, rs in enumerate(active):
            if i == 0 and to_add:
                targets[rs.name] = max(targets[rs.name] + to_add - added, 0)
            self.set_size(rs, targets[rs.name])

    def proportion(self, rs: RSView, to_add: int, added: int) -> int:
        if self.size(rs) == 0 or to_add == added:
            return 0
        fraction = self.fraction(rs)
        allowed = to_add - added
        return min(fraction, allowed) if to_add > 0 else max(fraction, allowed)

    def fraction(self, rs: RSView) -> int:
        if self.d.replicas == 0:
            return -self.size(rs)
        deployment_replicas = self.d.replicas + self.surge
        annotated = rs.max_replicas
        if annotated is None:
            annotated = int_field(self.d.status.get("replicas"))
        if annotated <= 0:
            return 0
        exact = self.size(rs) * deployment_replicas / annotated
        # integer.RoundToInt32: half away from zero.
        rounded = int(exact + 0.5) if exact >= 0 else int(exact - 0.5)
        return rounded - self.size(rs)


def is_scaling_event(d: DeploymentView, rss: Iterable[RSView]) -> bool:
    for rs in rss:
        if rs.replicas > 0 and rs.desired is not None and rs.desired != d.replicas:
            return True
    return False


def cleanup_candidates(d: DeploymentView, olds: Iterable[RSView]) -> list[str]:
    """Old ReplicaSets past ``revisionHistoryLimit`` that are safe to delete."""
    if d.revision_history_limit is None:
        return []
    cleanable = sorted(
        (rs for rs in olds if not rs.deleting), key=lambda rs: (rs.revision, rs.created, rs.name)
    )
    excess = len(cleanable) - d.revision_history_limit
    return [
        rs.name
        for rs in cleanable[: max(excess, 0)]
        if rs.status_replicas == 0 and rs.replicas == 0 and rs.generation <= rs.observed_generation
    ]


def deployment_complete(d: DeploymentView, status: Mapping[str, Any]) -> bool:
    return (
        int_field(status.get("updatedReplicas")) == d.replicas
        and int_field(status.get("replicas")) == d.replicas
        and int_field(status.get("availableReplicas")) == d.replicas
        and int_field(status.get("observedGeneration")) >= d.generation
    )


def plan_rollout(
    d: DeploymentView, rss: Iterable[RSView], *, old_pods_running: bool = False
) -> RolloutPlan:
    """One sync of the Deployment: see the module docstring for the rules."""
    all_rss = sorted(rss, key=by_creation)
    new = find_new(d, all_rss)
    olds = [rs for rs in all_rss if rs is not new]
    plan = RolloutPlan(new_rs=new.name if new is not None else None)
    max_old = max((rs.revision for rs in olds), default=0)
    plan.revision = new.revision if new is not None and new.revision > max_old else max_old + 1
    p = _Planner(d, all_rss, plan)

    def create(replicas: int) -> RSView:
        rs_hash = compute_hash(d.template, d.collision_count)
        plan.create = NewReplicaSet(f"{d.name}-{rs_hash}", rs_hash, replicas, plan.revision)
        view = RSView(
            plan.create.name,
            replicas,
            template=d.template,
            revision=plan.revision,
            created=float("inf"),
            desired=d.replicas,
            max_replicas=d.replicas + p.surge,
        )
        p.sizes[view.name] = replicas
        return view

    if d.paused or is_scaling_event(d, [*olds, *([new] if new else [])]):
        plan.step = "sync"
        p.scale(new, olds)
        if d.paused:
            plan.cleanup = cleanup_candidates(d, olds)
        return plan

    if d.recreate:
        plan.step = "recreate"
        active = [rs for rs in olds if p.size(rs) > 0]
        if active:
            for rs in active:
                p.scale_event(rs, 0)
            return plan
        if old_pods_running:
            plan.waiting = True
            return plan
        if new is None:
            create(d.replicas)
        else:
            p.scale_event(new, d.replicas)
        if deployment_complete(d, d.status):
            plan.cleanup = cleanup_candidates(d, olds)
        return plan

    plan.step = "rolling"
    if new is None:
        # Sized against the old ReplicaSets alone, as upstream creates it with 0 first.
        zero = RSView("", 0)
        p.sizes[""] = 0
        new = create(p.new_rs_new_replicas(olds, zero))
        del p.sizes[""]
    everything = [*olds, new]
    if p.reconcile_new(everything, new):
        return plan
    if p.reconcile_old(everything, [rs for rs in olds if p.size(rs) > 0], new):
        return plan
    if deployment_complete(d, d.status):
        plan.cleanup = cleanup_candidates(d, olds)
    return plan
