"""Field selectors: parsing, the field set of each kind, and matching.

Owns ``fields.ParseSelector`` (terms ``f=v``, ``f==v``, ``f!=v`` joined by ``,``,
with ``\\`` escaping ``,``, ``=`` and ``\\`` in values) and the fields each
kind supports, as upstream's per-kind ``GetAttrs``/field label conversion
(``metadata.name``/``metadata.namespace`` everywhere; ``spec.nodeName``,
``status.phase`` ... on pods; ``involvedObject.*`` on events).

Invariants: a selector naming a field the kind does not support is rejected with
400 ``field label not supported: <field>``; values compare as strings, exactly as
upstream's ``fields.Set`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.api.errors import ApiError


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    value: str
    negate: bool = False

    def matches(self, fields: Mapping[str, str]) -> bool:
        have = fields.get(self.field)
        # upstream: a field absent from the set compares as the empty string.
        equal = (have if have is not None else "") == self.value
        return not equal if self.negate else equal

    def __str__(self) -> str:
        return f"{self.field}{'!=' if self.negate else '='}{escape_value(self.value)}"


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.requirements

    def fields(self) -> tuple[str, ...]:
        return tuple(r.field for r in self.requirements)

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(r.matches(fields) for r in self.requirements)

    def matches_object(self, kind: str, obj: Mapping[str, Any]) -> bool:
        return self.matches(object_fields(kind, obj))

    def value_for(self, field: str) -> str | None:
        """The value of an equality term on ``field`` (for indexed lookups), if any."""
        for r in self.requirements:
            if r.field == field and not r.negate:
                return r.value
        return None

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def _split_terms(text: str) -> list[str]:
    terms: list[str] = []
    start, escaped = 0, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _split_term(term: str) -> tuple[str, str, str] | None:
    escaped = False
    for i, ch in enumerate(term):
        if escaped:
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], op, term[i + len(op) :]
    return None


def _unescape(value: str) -> str:
    out: list[str] = []
    escaped = False
    for ch in value:
        if escaped:
            if ch not in "\\,=":
                raise ApiError.bad_request(
                    f"invalid field selector: invalid escape sequence: \\{ch}"
                )
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",=":
            raise ApiError.bad_request(f"invalid field selector: unescaped {ch!r} in value")
        else:
            out.append(ch)
    if escaped:
        raise ApiError.bad_request("invalid field selector: unterminated escape sequence")
    return "".join(out)


def parse(text: str) -> FieldSelector:
    """Parse a ``fieldSelector`` query string; ``""`` selects everything."""
    if not text.strip():
        return FieldSelector()
    reqs: list[FieldRequirement] = []
    for term in _split_terms(text):
        if not term:
            continue
        split = _split_term(term)
        if split is None:
            raise ApiError.bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        field, op, value = split
        reqs.append(FieldRequirement(field.strip(), _unescape(value), op == "!="))
    return FieldSelector(tuple(reqs))


def parse_for(kind: str, namespaced: bool, text: str) -> FieldSelector:
    """Parse and check every field is one ``kind`` supports (400 otherwise)."""
    selector = parse(text)
    supported = supported_fields(kind, namespaced)
    for field in selector.fields():
        if field not in supported:
            raise ApiError.bad_request(f"field label not supported: {field}")
    return selector


# ------------------------------------------------------------------ field sets


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    cur: Any = obj
    for part in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


FieldFn = Callable[[Mapping[str, Any]], Any]


def _involved(name: str) -> FieldFn:
    return lambda o: _get(o, "involvedObject", name)


_KIND_FIELDS: dict[str, dict[str, FieldFn]] = {
    "Pod": {
        "spec.nodeName": lambda o: _get(o, "spec", "nodeName"),
        "spec.restartPolicy": lambda o: _get(o, "spec", "restartPolicy"),
        "spec.schedulerName": lambda o: _get(o, "spec", "schedulerName"),
        "spec.serviceAccountName": lambda o: _get(o, "spec", "serviceAccountName"),
        "spec.hostNetwork": lambda o: bool(_get(o, "spec", "hostNetwork")),
        "status.phase": lambda o: _get(o, "status", "phase"),
        "status.podIP": lambda o: _get(o, "status", "podIP"),
        "status.nominatedNodeName": lambda o: _get(o, "status", "nominatedNodeName"),
    },
    "Event": {
        **{
            f"involvedObject.{f}": _involved(f)
            for f in (
                "kind",
                "namespace",
                "name",
                "uid",
                "apiVersion",
                "resourceVersion",
                "fieldPath",
            )
        },
        "reason": lambda o: o.get("reason"),
        "reportingComponent": lambda o: o.get("reportingComponent"),
        "source": lambda o: _get(o, "source", "component"),
        "type": lambda o: o.get("type"),
    },
    "Node": {"spec.unschedulable": lambda o: bool(_get(o, "spec", "unschedulable"))},
    "Namespace": {"status.phase": lambda o: _get(o, "status", "phase")},
    "ReplicaSet": {"status.replicas": lambda o: _get(o, "status", "replicas") or 0},
    "Service": {
        "spec.clusterIP": lambda o: _get(o, "spec", "clusterIP"),
        "spec.type": lambda o: _get(o, "spec", "type"),
    },
}


def supported_fields(kind: str, namespaced: bool) -> frozenset[str]:
    base = {"metadata.name", "metadata.namespace"} if namespaced else {"metadata.name"}
    return frozenset(base | set(_KIND_FIELDS.get(kind, {})))


def object_fields(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    """The field set of ``obj`` as upstream's ``GetAttrs`` builds it."""
    out = {
        "metadata.name": _text(_get(obj, "metadata", "name")),
        "metadata.namespace": _text(_get(obj, "metadata", "namespace")),
    }
    for field, fn in _KIND_FIELDS.get(kind, {}).items():
        out[field] = _text(fn(obj))
    return out
