"""Strategic merge patch, and the dispatch of a PATCH body by its content type.

Owns ``application/strategic-merge-patch+json`` as kube-apiserver applies it
(``apimachinery/pkg/util/strategicpatch``, with ``MergeParallelList`` and
``IgnoreUnmatchedNulls``): maps merge key by key and ``null`` deletes; lists merge
by the merge key of :mod:`kproxy.api.patchmeta` or are replaced whole; the
directives ``$patch: replace|delete|merge``, ``$retainKeys``,
``$setElementOrder/<list>`` and ``$deleteFromPrimitiveList/<list>`` are honoured
and never stored. JSON merge patch and JSON patch live in
:mod:`kproxy.api.jsonpatch`; :func:`apply_patch` picks one by content type.

Invariants: inputs are never mutated; the result holds no ``$`` directive that
this module understands; any malformed patch raises :class:`ApiError` (400 for a
malformed body, 422 for a patch that cannot apply), never anything else.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from kproxy.api import jsonpatch, patchmeta
from kproxy.api.errors import ApiError
from kproxy.api.patchmeta import PatchMeta

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"

PATCH_TYPES = (JSON_PATCH, MERGE, STRATEGIC)

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_SET_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def _bad(message: str) -> ApiError:
    return ApiError.bad_request(message)


def _key(value: Any) -> str:
    # JSON identity: Python's 1 == True must not merge a bool with a number.
    return json.dumps(value, sort_keys=True)


def strategic_merge(original: Mapping[str, Any], patch: Any, kind: str) -> dict[str, Any]:
    """Apply a strategic merge patch to an object of ``kind`` (a new dict)."""
    if not isinstance(patch, Mapping):
        raise _bad("strategic merge patch must be a JSON object")
    return _merge_map(copy.deepcopy(dict(original)), patch, patchmeta.for_kind(kind))


def _clean(value: Any, meta: PatchMeta) -> Any:
    """A patch value landing where the original has nothing: directives resolved."""
    if isinstance(value, Mapping):
        return _merge_map({}, value, meta)
    if isinstance(value, list):
        return _merge_list([], value, meta)
    return copy.deepcopy(value)


def _merge_map(
    original: dict[str, Any], patch: Mapping[str, Any], meta: PatchMeta
) -> dict[str, Any]:
    directive = patch.get(_DIRECTIVE)
    if directive is not None:
        if directive == "replace":
            return _merge_map({}, {k: v for k, v in patch.items() if k != _DIRECTIVE}, meta)
        if directive == "delete":
            return {}
        if directive != "merge":
            raise _bad(f"Unknown patch type: {directive!r} in map: {dict(patch)!r}")

    if _RETAIN_KEYS in patch:
        retain = patch[_RETAIN_KEYS]
        if not isinstance(retain, list) or not all(isinstance(k, str) for k in retain):
            raise _bad(f"invalid {_RETAIN_KEYS} directive: must be a list of strings")
        for key in [k for k in original if k not in retain]:
            del original[key]

    orders: dict[str, list[Any]] = {}
    before: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key.startswith(_DELETE_PRIMITIVE):
            field = key[len(_DELETE_PRIMITIVE) :]
            if not isinstance(value, list):
                raise _bad(f"invalid {key}: must be a list")
            current = original.get(field)
            if isinstance(current, list):
                drop = {_key(v) for v in value}
                original[field] = [x for x in current if _key(x) not in drop]
        elif key.startswith(_SET_ORDER):
            if not isinstance(value, list):
                raise _bad(f"invalid {key}: must be a list")
            field = key[len(_SET_ORDER) :]
            orders[field] = value
            current = original.get(field)
            before[field] = list(current) if isinstance(current, list) else []

    for key, value in patch.items():
        if key in (_DIRECTIVE, _RETAIN_KEYS) or key.startswith((_SET_ORDER, _DELETE_PRIMITIVE)):
            continue
        child = meta.child(key)
        if value is None:
            original.pop(key, None)
            continue
        current = original.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            original[key] = _merge_map(current, value, child)
        elif isinstance(current, list) and isinstance(value, list):
            original[key] = _merge_list(current, value, child)
        else:
            original[key] = _clean(value, child)

    for field, order in orders.items():
        current = original.get(field)
        if isinstance(current, list):
            original[field] = _apply_order(
                current, order, before[field], meta.child(field).merge_key
            )
    return original


def _merge_list(original: list[Any], patch: list[Any], meta: PatchMeta) -> list[Any]:
    if not meta.merge:
        return copy.deepcopy(patch)
    element = PatchMeta(fields=meta.fields)
    items: list[Any] = []
    deletes: list[Mapping[str, Any]] = []
    for item in patch:
        if isinstance(item, Mapping) and _DIRECTIVE in item:
            directive = item[_DIRECTIVE]
            if directive == "replace":
                # The whole list is replaced by the patch's other elements.
                rest = [x for x in patch if not (isinstance(x, Mapping) and _DIRECTIVE in x)]
                return _merge_list([], rest, meta)
            if directive == "delete":
                deletes.append(item)
            elif directive != "merge":
                raise _bad(f"Unknown patch type: {directive!r} in list element: {dict(item)!r}")
            continue
        items.append(item)

    if meta.merge_key is None:
        if deletes:
            raise _bad("$patch: delete is not supported in a list of primitives")
        seen: set[str] = set()
        merged: list[Any] = []
        for x in [*original, *items]:
            if isinstance(x, Mapping | list):
                raise _bad(f"list of primitives holds a non-primitive: {x!r}")
            k = _key(x)
            if k not in seen:
                seen.add(k)
                merged.append(copy.deepcopy(x))
        return merged

    mk = meta.merge_key
    result = list(original)
    for item in deletes:
        if mk not in item:
            raise _bad(f"delete directive {dict(item)!r} does not contain merge key: {mk}")
        target = _key(item[mk])
        result = [x for x in result if not (isinstance(x, Mapping) and _key(x.get(mk)) == target)]
    for item in items:
        if not isinstance(item, Mapping):
            raise _bad(f"list with merge key {mk!r} holds a non-object: {item!r}")
        if mk not in item:
            raise _bad(f"map: {dict(item)!r} does not contain declared merge key: {mk}")
        target = _key(item[mk])
        for i, x in enumerate(result):
            if isinstance(x, dict) and _key(x.get(mk)) == target:
                result[i] = _merge_map(x, item, element)
                break
        else:
            result.append(_clean(item, element))
    return result


def _apply_order(
    merged: list[Any], order: list[Any], server: list[Any], merge_key: str | None
) -> list[Any]:
    """``$setElementOrder``: patch-ordered items interleaved with server-only items.

    As upstream's ``normalizeElementOrder``: items named in ``order`` take its order;
    the others keep their relative order; the two runs are merged by the position
    each item had in the ``server`` list before the patch, and where either item is
    new the patch's item goes first (``mergeSortedSlice``).
    """

    def key_of(item: Any) -> str:
        if merge_key is None:
            return _key(item)
        if not isinstance(item, Mapping) or merge_key not in item:
            raise _bad(f"$setElementOrder element {item!r} lacks merge key {merge_key!r}")
        return _key(item[merge_key])

    rank = {key_of(o): i for i, o in enumerate(order)}
    server_pos = {key_of(x): i for i, x in enumerate(server)}
    ordered = sorted((x for x in merged if key_of(x) in rank), key=lambda x: rank[key_of(x)])
    server_only = [x for x in merged if key_of(x) not in rank]
    out: list[Any] = []
    i = j = 0
    while i < len(server_only) or j < len(ordered):
        if j >= len(ordered):
            out.append(server_only[i])
            i += 1
        elif i >= len(server_only):
            out.append(ordered[j])
            j += 1
        elif _before(server_pos, key_of(server_only[i]), key_of(ordered[j])):
            out.append(server_only[i])
            i += 1
        else:
            out.append(ordered[j])
            j += 1
    return out


def _before(positions: Mapping[str, int], left: str, right: str) -> bool:
    # Only two items both present before the patch compare; otherwise the patch's wins.
    return left in positions and right in positions and positions[left] < positions[right]


def normalize_content_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def apply_patch(
    content_type: str, original: Mapping[str, Any], patch: Any, kind: str
) -> dict[str, Any]:
    """Apply a decoded PATCH body of ``content_type`` to ``original``; the result is an object."""
    media = normalize_content_type(content_type)
    if media == STRATEGIC:
        result: Any = strategic_merge(original, patch, kind)
    elif media == MERGE:
        result = jsonpatch.merge_patch(original, patch)
    elif media == JSON_PATCH:
        result = jsonpatch.apply(original, patch)
    else:
        raise ApiError.unsupported_media_type(content_type)
    if not isinstance(result, dict):
        raise ApiError.unprocessable("the patched object is not a JSON object")
    return result
