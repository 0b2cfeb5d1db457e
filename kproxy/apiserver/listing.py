"""LIST: query parsing, selectors, paging with continue tokens, resourceVersion rules.

Owns :class:`ListQuery` (``labelSelector``, ``fieldSelector``, ``limit``, ``continue``,
``resourceVersion``, ``resourceVersionMatch`` from a query string, with upstream's 400s)
and :func:`list_objects`, which reads one consistent store snapshot page by page and
filters it.

Continue tokens are upstream's shape, base64 of ``{"v":"meta.k8s.io/v1","rv":R,
"start":"<key after which to continue>"}``: every page of one list comes from the
snapshot at revision ``R``; once ``R`` is compacted the token is expired (410).

Resource versions: unset/"0" and a plain RV (``NotOlderThan``) read the latest state
(after checking the RV is not in the future); ``resourceVersionMatch=Exact`` reads
the snapshot at exactly that revision (410 when compacted).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.api import fieldselectors, selectors
from kproxy.api.errors import ApiError
from kproxy.api.fieldselectors import FieldSelector
from kproxy.api.kinds import Kind
from kproxy.api.selectors import Selector
from kproxy.store import Compacted, FutureRevision, Store

STORE_PAGE = 250
_NO_FIELDS = FieldSelector()
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue "
    "token in this response to retrieve the remainder of the results. Continuing with "
    "the provided token results in an inconsistent list - objects that were created, "
    "modified, or deleted between the time the first chunk was returned and now may "
    "show up in the list."
)


def parse_rv(value: str | None, what: str = "resourceVersion") -> int | None:
    """A resourceVersion query value as an int (None when unset); 400 when not a number."""
    if value is None or value == "":
        return None
    try:
        rv = int(value)
    except ValueError:
        rv = -1
    if rv < 0:
        raise ApiError.bad_request(f'invalid {what} "{value}": must be a non-negative integer')
    return rv


def parse_bool(params: Mapping[str, str], name: str) -> bool:
    value = params.get(name, "")
    if value.lower() in ("", "false", "0"):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise ApiError.bad_request(f'invalid boolean for "{name}": "{value}"')


def parse_int(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError.bad_request(f'invalid integer for "{name}": "{value}"') from None


@dataclass(frozen=True, slots=True)
class ListQuery:
    labels: Selector = selectors.EVERYTHING
    fields: FieldSelector = _NO_FIELDS
    limit: int | None = None
    continue_token: str | None = None
    resource_version: int | None = None
    rv_match: str = ""

    @classmethod
    def from_params(cls, kind: Kind, params: Mapping[str, str]) -> ListQuery:
        labels = selectors.parse(params.get("labelSelector", ""))
        fields = fieldselectors.parse_for(
            kind.kind, kind.namespaced, params.get("fieldSelector", "")
        )
        limit = parse_int(params, "limit")
        if limit is not None and limit <= 0:
            limit = None
        token = params.get("continue") or None
        rv = parse_rv(params.get("resourceVersion"))
        match = params.get("resourceVersionMatch", "")
        if match not in ("", "Exact", "NotOlderThan"):
            raise ApiError.bad_request(f'unsupported resourceVersionMatch "{match}"')
        if match and rv is None and not parse_bool(params, "sendInitialEvents"):
            raise ApiError.bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided"
            )
        if match == "Exact" and rv == 0:
            raise ApiError.bad_request(
                'resourceVersionMatch "Exact" is forbidden for resourceVersion "0"'
            )
        if token and rv not in (None, 0):
            raise ApiError.bad_request(
                "specifying resource version is not allowed when using continue"
            )
        return cls(labels, fields, limit, token, rv, match)

    def matches(self, kind: Kind, obj: Mapping[str, Any]) -> bool:
        if not self.labels.empty and not self.labels.matches_object(obj):
            return False
        return self.fields.empty or self.fields.matches_object(kind.kind, obj)


def encode_continue(revision: int, start: str) -> str:
    doc = {"v": "meta.k8s.io/v1", "rv": revision, "start": start}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_continue(token: str, prefix: str) -> tuple[int, str]:
    """(revision, key to continue after); 400 for anything malformed or foreign."""
    try:
        padded = token + "=" * (-len(token) % 4)
        doc = json.loads(base64.urlsafe_b64decode(padded.encode()))
        revision, start = doc["rv"], doc["start"]
        if doc.get("v") != "meta.k8s.io/v1" or not isinstance(start, str):
            raise ValueError("bad version or start")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision <= 0:
            raise ValueError("bad revision")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError.bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion "
            "(version meta.k8s.io/v1)"
        ) from None
    if not start.startswith(prefix):
        raise ApiError.bad_request("continue key is not valid: key is outside the requested list")
    return revision, start


def list_kind(kind: Kind) -> tuple[str, str]:
    return kind.api_version, kind.list_kind


async def list_objects(store: Store, kind: Kind, prefix: str, query: ListQuery) -> dict[str, Any]:
    """The ``<Kind>List`` for ``query`` over keys under ``prefix``."""
    revision: int | None = None
    start: str | None = None
    if query.continue_token:
        revision, start = decode_continue(query.continue_token, prefix)
    elif query.resource_version:
        current = await store.current_revision()
        if query.resource_version > current:
            raise ApiError(
                504,
                "Timeout",
                f"Too large resource version: {query.resource_version}, current: {current}",
            )
        if query.rv_match == "Exact":
            revision = query.resource_version
    items: list[dict[str, Any]] = []
    more = False
    last = start
    page = min(STORE_PAGE, query.limit) if query.limit else None
    try:
        while True:
            kvs, rev = await store.list(
                prefix,
                revision=revision,
                limit=None if page is None else page + 1,
                start_after=last,
            )
            revision = revision or rev
            batch = kvs if page is None else kvs[:page]
            store_more = page is not None and len(kvs) > page
            done = False
            for i, kv in enumerate(batch):
                last = kv.key
                obj = json.loads(kv.value)
                obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
                if not query.matches(kind, obj):
                    continue
                items.append(obj)
                if query.limit and len(items) >= query.limit:
                    more = i < len(batch) - 1 or store_more
                    done = True
                    break
            if done or not store_more:
                break
    except Compacted as exc:
        if query.continue_token:
            raise ApiError.expired(CONTINUE_EXPIRED) from None
        raise ApiError.too_old_resource_version(exc.requested, exc.compact_revision) from None
    except FutureRevision as exc:
        raise ApiError(
            504, "Timeout", f"Too large resource version: {exc.requested}, current: {exc.current}"
        ) from None
    metadata: dict[str, Any] = {"resourceVersion": str(revision)}
    if more and last is not None:
        metadata["continue"] = encode_continue(revision or 0, last)
    api_version, list_kind_name = list_kind(kind)
    return {"kind": list_kind_name, "apiVersion": api_version, "metadata": metadata, "items": items}
