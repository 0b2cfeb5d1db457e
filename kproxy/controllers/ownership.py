"""Owner references and claiming: who controls what.

Owns the metadata accessors the workload controllers and the garbage collector
share (uid, deletion, finalizers, owner references), the controller reference a
ReplicaSet puts on its pods and a Deployment on its ReplicaSets
(:func:`controller_ref_to`), the indexers that find dependents in an informer
cache (:data:`CONTROLLER_UID_INDEX`, :data:`OWNER_UID_INDEX`) and
:func:`plan_claim`, upstream's ``ControllerRefManager.ClaimObject`` as a decision.

Invariants (upstream's): an object has at most one controller reference; a
controller adopts only orphans that match its selector and are not being deleted,
and never while it is itself being deleted; it releases objects it controls that
stopped matching (again not while deleting); objects controlled by someone else
are never touched.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.api.selectors import Selector
from kproxy.client.errors import Conflict, NotFound
from kproxy.client.rest import Resource, RestClient

log = logging.getLogger(__name__)

Obj = dict[str, Any]

CONTROLLER_UID_INDEX = "kproxy.controllers/controller-uid"
OWNER_UID_INDEX = "kproxy.controllers/owner-uid"

FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_FINALIZER = "orphan"


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def uid_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("uid") or "")


def name_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("name") or "")


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("namespace") or "")


def is_deleting(obj: Mapping[str, Any]) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def finalizers_of(obj: Mapping[str, Any]) -> list[str]:
    fins = meta(obj).get("finalizers")
    return [str(f) for f in fins] if isinstance(fins, list) else []


def owner_refs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refs = meta(obj).get("ownerReferences")
    return [r for r in refs if isinstance(r, Mapping)] if isinstance(refs, list) else []


def controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference with ``controller: true`` (upstream ``GetControllerOf``)."""
    for ref in owner_refs(obj):
        if ref.get("controller") is True:
            return ref
    return None


def controller_ref_to(owner: Mapping[str, Any], api_version: str = "", kind: str = "") -> Obj:
    """The controller reference a dependent of ``owner`` carries (``NewControllerRef``);
    ``api_version``/``kind`` stand in when the object lacks them."""
    return {
        "apiVersion": str(owner.get("apiVersion") or api_version),
        "kind": str(owner.get("kind") or kind),
        "name": name_of(owner),
        "uid": uid_of(owner),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid_index(obj: Obj) -> list[str]:
    ref = controller_ref(obj)
    return [str(ref.get("uid"))] if ref is not None and ref.get("uid") else []


def owner_uid_index(obj: Obj) -> list[str]:
    return sorted({str(r.get("uid")) for r in owner_refs(obj) if r.get("uid")})


def with_owner_refs(obj: Mapping[str, Any], refs: Iterable[Mapping[str, Any]]) -> Obj:
    """A deep copy of ``obj`` with exactly ``refs`` as its owner references."""
    out: Obj = copy.deepcopy(dict(obj))
    new = [dict(r) for r in refs]
    m = out.setdefault("metadata", {})
    if new:
        m["ownerReferences"] = new
    else:
        m.pop("ownerReferences", None)
    return out


def adopted(obj: Mapping[str, Any], ref: Mapping[str, Any]) -> Obj:
    return with_owner_refs(obj, [*owner_refs(obj), ref])


def released(obj: Mapping[str, Any], owner_uid: str) -> Obj:
    return with_owner_refs(obj, [r for r in owner_refs(obj) if r.get("uid") != owner_uid])


@dataclass
class Claim:
    """What a controller does with the candidates it looked at."""

    owned: list[Obj] = field(default_factory=list)  # controlled and matching: keep
    adopt: list[Obj] = field(default_factory=list)  # orphans to take (then keep)
    release: list[Obj] = field(default_factory=list)  # controlled, no longer matching


def plan_claim(owner: Mapping[str, Any], selector: Selector, candidates: Iterable[Obj]) -> Claim:
    """Sort ``candidates`` (same namespace as ``owner``) into keep / adopt / release."""
    claim = Claim()
    owner_uid = uid_of(owner)
    owner_deleting = is_deleting(owner)
    for obj in candidates:
        ref = controller_ref(obj)
        matches = selector.matches_object(obj)
        if ref is not None:
            if ref.get("uid") != owner_uid:
                continue  # someone else's
            if matches:
                claim.owned.append(obj)
            elif not owner_deleting:
                claim.release.append(obj)
            continue
        if owner_deleting or not matches or is_deleting(obj):
            continue
        claim.adopt.append(obj)
    return claim


async def apply_claim(
    client: RestClient,
    resource: Resource,
    owner: Mapping[str, Any],
    owner_resource: Resource,
    claim: Claim,
    ref: Mapping[str, Any],
) -> list[Obj]:
    """Adopt and release as ``claim`` says; the objects the owner now controls.

    Writes are PUTs guarded by the object's resourceVersion, so a pod or ReplicaSet
    that changed meanwhile is skipped (its update event brings the owner back).
    Before adopting, the owner is read fresh (upstream's ``canAdopt``): one that is
    being deleted, or was replaced under the same name, adopts nothing.
    """
    owned = list(claim.owned)
    ns = namespace_of(owner)
    if claim.adopt:
        try:
            fresh = await client.get(owner_resource, name_of(owner), ns)
        except NotFound:
            fresh = {}
        if uid_of(fresh) != uid_of(owner) or is_deleting(fresh):
            log.info("%s/%s: not adopting (owner gone or deleting)", ns, name_of(owner))
        else:
            for obj in claim.adopt:
                try:
                    owned.append(await client.update(resource, adopted(obj, ref), ns))
                except (Conflict, NotFound) as exc:
                    log.debug("adopting %s/%s skipped: %s", ns, name_of(obj), exc)
    for obj in claim.release:
        try:
            await client.update(resource, released(obj, uid_of(owner)), ns)
        except (Conflict, NotFound) as exc:
            log.debug("releasing %s/%s skipped: %s", ns, name_of(obj), exc)
    return owned
