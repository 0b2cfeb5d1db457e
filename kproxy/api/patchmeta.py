"""Strategic-merge-patch metadata: the merge strategy of each list, per kind.

Owns the table that ``k8s.io/api``'s struct tags (``patchStrategy``,
``patchMergeKey``) give the served kinds: which lists merge by a key (containers
by ``name``, container ports by ``containerPort``, Service ports by ``port``,
conditions by ``type``, ownerReferences by ``uid`` ...), which primitive lists
merge as sets (``metadata.finalizers``, node ``spec.podCIDRs``), and which structs
carry ``retainKeys`` (pod volumes, Deployment ``spec.strategy``).

Invariants: a field that is not in the table is a plain map (merged key by key)
or an atomic list (replaced whole), which is upstream's behaviour for untagged
fields (``tolerations``, EndpointSlice ``endpoints``, Endpoints ``subsets``,
Service ``externalIPs``, Node ``taints``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class PatchMeta:
    """Patch strategy of one field; ``fields`` describe its members (or list elements)."""

    merge: bool = False  # list: patchStrategy "merge" (set union for primitives)
    merge_key: str | None = None  # list of objects: patchMergeKey
    retain_keys: bool = False  # patchStrategy "retainKeys"
    fields: Mapping[str, PatchMeta] = field(default_factory=lambda: MappingProxyType({}))

    def child(self, name: str) -> PatchMeta:
        return self.fields.get(name, PLAIN)


PLAIN = PatchMeta()


def _struct(**fields: PatchMeta) -> PatchMeta:
    return PatchMeta(fields=MappingProxyType(fields))


def _keyed(key: str, element: PatchMeta = PLAIN, *, retain_keys: bool = False) -> PatchMeta:
    return PatchMeta(
        merge=True,
        merge_key=key,
        fields=element.fields,
        retain_keys=retain_keys,
    )


_SET = PatchMeta(merge=True)
_CONDITIONS = _keyed("type")

OBJECT_META = _struct(ownerReferences=_keyed("uid"), finalizers=_SET)

# core/v1 Container: ports (containerPort), env (name), volumeMounts (mountPath),
# volumeDevices (devicePath); envFrom and resizePolicy are atomic.
CONTAINER = _struct(
    ports=_keyed("containerPort"),
    env=_keyed("name"),
    volumeMounts=_keyed("mountPath"),
    volumeDevices=_keyed("devicePath"),
)

POD_SPEC = _struct(
    volumes=_keyed("name", retain_keys=True),
    initContainers=_keyed("name", CONTAINER),
    containers=_keyed("name", CONTAINER),
    ephemeralContainers=_keyed("name", CONTAINER),
    imagePullSecrets=_keyed("name"),
    hostAliases=_keyed("ip"),
    topologySpreadConstraints=_keyed("topologyKey"),
    resourceClaims=_keyed("name", retain_keys=True),
    schedulingGates=_keyed("name"),
)

POD_STATUS = _struct(
    conditions=_CONDITIONS,
    podIPs=_keyed("ip"),
    hostIPs=_keyed("ip"),
    resourceClaimStatuses=_keyed("name", retain_keys=True),
)

POD_TEMPLATE = _struct(metadata=OBJECT_META, spec=POD_SPEC)

_WORKLOAD_STATUS = _struct(conditions=_CONDITIONS)

KIND_PATCH_META: Mapping[str, PatchMeta] = MappingProxyType(
    {
        "Pod": _struct(metadata=OBJECT_META, spec=POD_SPEC, status=POD_STATUS),
        "Service": _struct(
            metadata=OBJECT_META,
            spec=_struct(ports=_keyed("port")),
            status=_struct(conditions=_CONDITIONS),
        ),
        "Node": _struct(
            metadata=OBJECT_META,
            spec=_struct(podCIDRs=_SET),
            status=_struct(conditions=_CONDITIONS, addresses=_keyed("type")),
        ),
        "Namespace": _struct(metadata=OBJECT_META, status=_struct(conditions=_CONDITIONS)),
        "Deployment": _struct(
            metadata=OBJECT_META,
            spec=_struct(template=POD_TEMPLATE, strategy=PatchMeta(retain_keys=True)),
            status=_WORKLOAD_STATUS,
        ),
        "ReplicaSet": _struct(
            metadata=OBJECT_META,
            spec=_struct(template=POD_TEMPLATE),
            status=_WORKLOAD_STATUS,
        ),
        "Endpoints": _struct(metadata=OBJECT_META),
        "EndpointSlice": _struct(metadata=OBJECT_META),
        "Event": _struct(metadata=OBJECT_META),
        "ConfigMap": _struct(metadata=OBJECT_META),
        "Lease": _struct(metadata=OBJECT_META),
        "Scale": _struct(metadata=OBJECT_META),
        "Binding": _struct(metadata=OBJECT_META),
    }
)

# Kinds not in the table still get ObjectMeta's strategies.
DEFAULT_PATCH_META = _struct(metadata=OBJECT_META)


def for_kind(kind: str) -> PatchMeta:
    return KIND_PATCH_META.get(kind, DEFAULT_PATCH_META)
