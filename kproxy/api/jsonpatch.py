"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902) with JSON pointers (RFC 6901).

Owns the two schema-less patch formats kubectl and the Python client send
(``kubectl patch --type merge|json``, ``kubectl scale``/``label``, the client's
list bodies).

Invariants: inputs are never mutated; equality in ``test`` is JSON equality
(``1 == 1.0``, but ``true != 1``); a malformed patch document raises
:class:`ApiError` 400 and an operation that cannot apply raises 422, as
kube-apiserver answers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kproxy.api.errors import ApiError


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` removes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def parse_pointer(pointer: Any) -> list[str]:
    """RFC 6901: ``""`` is the whole document; ``~1`` is ``/`` and ``~0`` is ``~``."""
    if not isinstance(pointer, str):
        raise ApiError.bad_request(f"JSON pointer must be a string: {pointer!r}")
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ApiError.unprocessable(f'JSON pointer must start with "/": {pointer!r}')
    tokens = []
    for raw in pointer[1:].split("/"):
        i = raw.find("~")
        while i != -1:
            if i + 1 >= len(raw) or raw[i + 1] not in "01":
                raise ApiError.unprocessable(f"invalid escape in JSON pointer: {pointer!r}")
            i = raw.find("~", i + 2)
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


def _index(token: str, length: int, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return length
    if not token.isdigit() or not token.isascii() or (len(token) > 1 and token[0] == "0"):
        raise ApiError.unprocessable(f"invalid array index: {token!r}")
    index = int(token)
    if index > length or (index == length and not allow_end):
        raise ApiError.unprocessable(f"array index out of bounds: {index}")
    return index


def _parent(doc: Any, tokens: list[str], pointer: str) -> Any:
    cur = doc
    for token in tokens[:-1]:
        if isinstance(cur, dict):
            if token not in cur:
                raise ApiError.unprocessable(f"path not found: {pointer}")
            cur = cur[token]
        elif isinstance(cur, list):
            cur = cur[_index(token, len(cur), allow_end=False)]
        else:
            raise ApiError.unprocessable(f"path not found: {pointer}")
    return cur


def _get(doc: Any, pointer: str) -> Any:
    tokens = parse_pointer(pointer)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ApiError.unprocessable(f"path not found: {pointer}")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(last, len(parent), allow_end=False)]
    raise ApiError.unprocessable(f"path not found: {pointer}")


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = parse_pointer(pointer)
    if not tokens:
        return value
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), allow_end=True), value)
    else:
        raise ApiError.unprocessable(f"cannot add to a scalar at {pointer}")
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    tokens = parse_pointer(pointer)
    if not tokens:
        raise ApiError.unprocessable("cannot remove the whole document")
    parent = _parent(doc, tokens, pointer)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ApiError.unprocessable(f"path not found: {pointer}")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(last, len(parent), allow_end=False)]
    else:
        raise ApiError.unprocessable(f"path not found: {pointer}")
    return doc


def _field(op: Mapping[str, Any], name: str, index: int) -> Any:
    if name not in op:
        raise ApiError.bad_request(f"JSON patch operation {index} is missing {name!r}")
    return op[name]


def apply(document: Any, patch: Any) -> Any:
    """Apply an RFC 6902 operation list to a copy of ``document``."""
    if not isinstance(patch, list):
        raise ApiError.bad_request("JSON patch must be a JSON array of operations")
    doc = copy.deepcopy(document)
    for i, op in enumerate(patch):
        if not isinstance(op, Mapping):
            raise ApiError.bad_request(f"JSON patch operation {i} is not an object")
        name = _field(op, "op", i)
        path = _field(op, "path", i)
        if name == "add":
            doc = _add(doc, path, copy.deepcopy(_field(op, "value", i)))
        elif name == "remove":
            doc = _remove(doc, path)
        elif name == "replace":
            _get(doc, path)  # must exist
            value = copy.deepcopy(_field(op, "value", i))
            doc = _add(_remove(doc, path), path, value) if parse_pointer(path) else value
        elif name == "move":
            source = _field(op, "from", i)
            src, dst = parse_pointer(source), parse_pointer(path)
            if src == dst:
                _get(doc, source)
                continue
            if dst[: len(src)] == src:
                raise ApiError.unprocessable(
                    f"a location cannot be moved into one of its children: {source} -> {path}"
                )
            value = _get(doc, source)
            doc = _add(_remove(doc, source), path, value)
        elif name == "copy":
            value = copy.deepcopy(_get(doc, _field(op, "from", i)))
            doc = _add(doc, path, value)
        elif name == "test":
            if not json_equal(_get(doc, path), _field(op, "value", i)):
                raise ApiError.unprocessable(f"testing value {path} failed")
        else:
            raise ApiError.unprocessable(f"unexpected kind of JSON patch operation: {name!r}")
    return doc
