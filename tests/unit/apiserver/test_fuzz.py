"""Ten thousand and more malformed or random requests never get a 5xx.

Seeded random generation (reproducible: ``KPROXY_FUZZ_SEED``; the count is
``KPROXY_FUZZ_REQUESTS``) against the in-process apiserver on the sqlite store. Each
request is one of these families (see :data:`FAMILIES`):

- random JSON bodies POSTed to every kind's collection, valid manifests with a field
  swapped for junk (wrong types), wrong ``kind``/``apiVersion``, mismatched names;
- huge, unicode and control-character names, in the body and in the URL;
- label and field selectors built from selector grammar fragments;
- bad patches of every content type (merge, strategic with ``$patch``/``$setElementOrder``
  directives, JSON patch ops with odd pointers, apply YAML that is not YAML);
- bad query parameters on every verb (limit, continue, resourceVersion, dryRun, ...);
- PUTs and DELETEs with junk bodies, DeleteOptions and preconditions, deletecollection;
- watch requests with odd parameters (only the status line is read);
- random paths and methods (unknown groups, non-resource paths, odd escapes), odd
  Content-Type and Accept headers (Table), bodies that are not UTF-8, too deep or too big.

Assertions: no response is a 5xx (except upstream's own two: 500 for a Service
allocator's "range is full" and 504 "Too large resource version" for a list at a
future resourceVersion; both are counted and printed), and afterwards the server still
answers ``/healthz`` and a normal create/get. The request count and the status
histogram (overall and per family) are printed (``-s``). A crash in ``kproxy.api``
that the strategy guard turned into a 422 is reported as a warning, not a failure: it
is a bug to fix there, but the client got a verdict.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from kproxy.apiserver.strategy import API_CRASH
from tests.unit.apiserver.harness import MANIFESTS, Harness, run

REQUESTS = int(os.environ.get("KPROXY_FUZZ_REQUESTS", "12000"))
SEED = int(os.environ.get("KPROXY_FUZZ_SEED", "20261127"))
WORKERS = 4  # concurrent clients: also exercises the store's writer under contention
RESEED_EVERY = 150  # re-create the base objects that deletes and patches wore away

Obj = dict[str, Any]

PATCH_MEDIA = [
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
]
OTHER_MEDIA = [
    "application/json",
    "application/json; charset=utf-8",
    "application/yaml",
    "text/plain",
    "application/vnd.kubernetes.protobuf",
    "application/x-www-form-urlencoded",
    "",
    "application/json; charset=utf-16",
    "multipart/form-data; boundary=x",
    ";;;",
]
ACCEPTS = [
    "application/json",
    "application/json;as=Table;v=v1;g=meta.k8s.io",
    "application/json;as=Table;v=v1beta1;g=meta.k8s.io, application/json",
    "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
    "application/vnd.kubernetes.protobuf",
    "*/*",
    "text/html",
    ";as=Table",
    "",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FOO"]
WEIRD_NAMES = [
    "",
    " ",
    "A",
    "-a",
    "a-",
    "a.",
    ".",
    "..",
    "a..b",
    "a_b",
    "a/b",
    "a%2Fb",
    "a b",
    "ñandú",
    "名前",
    "🙂",
    "\u202eevil",
    "a\x00b",
    "a\nb",
    "a\tb",
    "default",
    "kube-system",
    "x" * 63,
    "x" * 64,
    "x" * 253,
    "x" * 254,
    "y" * 5000,
    "a" * 70000,  # beyond aiohttp's request-line limit when it lands in the URL
    "0" * 10,
    "10.96.0.1",
    "${HOME}",
    "'; DROP TABLE kv; --",
]
SCALARS: list[Any] = [
    None,
    0,
    -1,
    1,
    1.5,
    -0.0,
    1e308,
    True,
    False,
    "",
    "x",
    "None",
    "null",
    "80",
    "TCP",
    "10.96.0.1",
    "::1",
    "1.2.3.4/33",
    [],
    {},
    2**31,
    2**63,
    2**70,
    -(2**64),
    "2026-13-45T25:61:61Z",
    "名前",
    "\x00",
]
FIELD_NAMES = [
    "metadata",
    "spec",
    "status",
    "name",
    "namespace",
    "labels",
    "annotations",
    "ports",
    "port",
    "targetPort",
    "nodePort",
    "protocol",
    "selector",
    "matchLabels",
    "matchExpressions",
    "clusterIP",
    "clusterIPs",
    "type",
    "containers",
    "image",
    "endpoints",
    "addresses",
    "conditions",
    "replicas",
    "template",
    "finalizers",
    "ownerReferences",
    "resourceVersion",
    "uid",
    "generation",
    "deletionTimestamp",
    "apiVersion",
    "kind",
    "items",
    "$patch",
    "$retainKeys",
    "$setElementOrder/ports",
    "$deleteFromPrimitiveList/finalizers",
    "a",
]
LABEL_TOKENS = [
    "a",
    "b",
    "app",
    "x/y",
    "a.b/c",
    "k8s.io/x",
    "-a",
    "a-",
    "=",
    "==",
    "!=",
    "!",
    "in",
    "notin",
    "(",
    ")",
    ",",
    " ",
    "a b",
    "",
    "名",
    "x" * 70,
    "%",
    ">",
    "<",
    "1",
    "gt",
]
FIELD_TOKENS = [
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.phase",
    "spec.unschedulable",
    "involvedObject.kind",
    "type",
    "spec.clusterIP",
    "x",
    "=",
    "==",
    "!=",
    ",",
    "\\",
    "\\,",
    "a",
    "Running",
    "",
    "名",
    "metadata.",
    ".",
]
QUERY_VALUES = [
    "",
    "0",
    "1",
    "-1",
    "-5",
    "abc",
    "1.5",
    "true",
    "false",
    "All",
    "Exact",
    "NotOlderThan",
    "Foreground",
    "Background",
    "Orphan",
    "Strict",
    "Warn",
    "Ignore",
    "x,y",
    "a=b",
    "a in (b",
    "99999999999999999999999",
    str(2**63),
    str(2**63 - 1),
    "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MSwic3RhcnQiOiJhIn0",  # base64 JSON continue
    "e30",  # base64 "{}"
    "bm90IGpzb24",  # base64 "not json"
    "!!!",
    "名",
    "\x00",
]
QUERY_KEYS = [
    "labelSelector",
    "fieldSelector",
    "limit",
    "continue",
    "resourceVersion",
    "resourceVersionMatch",
    "timeoutSeconds",
    "dryRun",
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
    "allowWatchBookmarks",
    "sendInitialEvents",
    "fieldManager",
    "fieldValidation",
    "force",
    "pretty",
    "includeUninitialized",
    "export",
    "x",
]
PATH_SEGMENTS = [
    "api",
    "apis",
    "v1",
    "v2",
    "apps",
    "discovery.k8s.io",
    "coordination.k8s.io",
    "x.y",
    "namespaces",
    "default",
    "kube-system",
    "nope",
    "pods",
    "services",
    "configmaps",
    "deployments",
    "nodes",
    "status",
    "scale",
    "binding",
    "finalize",
    "watch",
    "proxy",
    "log",
    "exec",
    "healthz",
    "livez",
    "readyz",
    "version",
    "openapi",
    "metrics",
    "..",
    ".",
    "%2e%2e",
    "%2F",
    "%00",
    "名",
    "",
]
OPS = ["add", "remove", "replace", "move", "copy", "test", "x", "", None, 1]
POINTERS = [
    "",
    "/",
    "/spec",
    "/spec/ports",
    "/spec/ports/0",
    "/spec/ports/-",
    "/spec/ports/99",
    "/spec/ports/-1",
    "/spec/ports/01",
    "/metadata/name",
    "/metadata/labels/a~1b",
    "/metadata/labels/~2",
    "/metadata/annotations",
    "/metadata/finalizers/0",
    "/status",
    "/a/b/c",
    "spec",
    "~",
    "/data/k",
    "/spec/replicas",
    "/spec/template/spec/containers/0/image",
    "/endpoints/0/addresses/0",
]
YAML_BODIES = [
    "a: [",
    "{",
    "- 1\n- 2",
    "just a string",
    "!!python/object:os.system ls",
    "a: &x [1]\nb: *x\n",
    "a: &a [*a]",
    "? [1, 2]\n: x",
    "metadata:\n  name: 1\n",
    "metadata: []\n",
    "apiVersion: v1\nkind: Foo\n",
    "---\na: 1\n---\nb: 2\n",
    "\t",
    "a: !!binary AAAA",
    "a: 2001-01-01",
    "a: .nan",
    "%YAML 9.9\n---\na: 1",
]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.45:
        value = rng.choice(SCALARS)
        # A fresh [] / {}: later mutation of one request must not alias the pool.
        return type(value)() if isinstance(value, list | dict) else value
    if pick < 0.75:
        return {rng.choice(FIELD_NAMES): _junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _mutate(rng: random.Random, obj: Any) -> Any:
    """A valid manifest with one field (at any depth) replaced, removed or retyped."""
    obj = copy.deepcopy(obj)
    node = obj
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            roll = rng.random()
            if roll < 0.1:
                del node[key]
                return obj
            if roll < 0.45 or not isinstance(node[key], dict | list):
                node[key] = _junk(rng)
                return obj
            node = node[key]
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.4:
                node[i] = _junk(rng)
                return obj
            node = node[i]
    if isinstance(node, dict):
        node[rng.choice(FIELD_NAMES)] = _junk(rng)
    return obj


def _weird_name(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(WEIRD_NAMES)
    alphabet = "abz09-.名ñ🙂\u0301\u200b/%~ "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))


def _label_selector(rng: random.Random) -> str:
    return "".join(rng.choice(LABEL_TOKENS) for _ in range(rng.randint(1, 7)))


def _field_selector(rng: random.Random) -> str:
    return "".join(rng.choice(FIELD_TOKENS) for _ in range(rng.randint(1, 6)))


def _query(rng: random.Random, n: int | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in rng.sample(QUERY_KEYS, rng.randint(0, 3) if n is None else n):
        if key == "labelSelector" and rng.random() < 0.6:
            out[key] = _label_selector(rng)
        elif key == "fieldSelector" and rng.random() < 0.6:
            out[key] = _field_selector(rng)
        else:
            out[key] = rng.choice(QUERY_VALUES)
    return out


@dataclass
class Req:
    """One request to send; ``watch`` ones are closed after the status line."""

    family: str
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    content_type: str | None = None
    accept: str | None = None
    watch: bool = False


def _enc(name: str) -> str:
    return quote(name, safe="")


def _target(rng: random.Random) -> tuple[str, str, Obj]:
    resource = rng.choice(sorted(MANIFESTS))
    path, manifest = MANIFESTS[resource]
    return resource, path, manifest


def _obj_path(rng: random.Random, path: str, manifest: Obj) -> str:
    name = manifest["metadata"]["name"] if rng.random() < 0.8 else "missing"
    sub = rng.choice(["", "", "", "", "", "/status", "/scale", "/binding", "/finalize", "/x"])
    return f"{path}/{name}{sub}"


def gen_create_junk(rng: random.Random) -> Req:
    _, path, _ = _target(rng)
    body = _junk(rng)
    if rng.random() < 0.5:  # named, so that it gets past the name check to the fields
        extra = _junk(rng, 1)
        body = {"metadata": {"name": f"j{rng.randrange(10**6)}"}}
        if isinstance(extra, dict):
            body.update(extra)
    return Req("create-junk", "POST", path, _query(rng, 0), json.dumps(body).encode())


def gen_create_mutated(rng: random.Random) -> Req:
    resource, path, manifest = _target(rng)
    body = _mutate(rng, manifest)
    if isinstance(body, dict) and isinstance(body.get("metadata"), dict) and rng.random() < 0.8:
        body["metadata"]["name"] = f"{resource[:3]}-{rng.randrange(10**6)}"
    if isinstance(body, dict) and rng.random() < 0.2:
        body["kind"] = rng.choice(["Pod", "Service", "Foo", "", 1, None])
        body["apiVersion"] = rng.choice(["v1", "apps/v1", "v2", "x/y/z", "", 1])
    return Req("create-mutated", "POST", path, {}, json.dumps(body).encode())


def gen_names(rng: random.Random) -> Req:
    resource, path, manifest = _target(rng)
    name = _weird_name(rng)
    body = copy.deepcopy(manifest)
    body["metadata"]["name"] = name
    if rng.random() < 0.2:
        body["metadata"]["generateName"] = name
        del body["metadata"]["name"]
    if rng.random() < 0.2:
        body["metadata"]["labels"] = {_weird_name(rng): _weird_name(rng)}
    if rng.random() < 0.1:
        body["metadata"]["namespace"] = _weird_name(rng)
    method = rng.choice(["POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
    if method == "POST":
        target = path
    elif rng.random() < 0.3 and resource not in ("namespaces", "nodes"):
        target = path.replace("/default/", f"/{_enc(_weird_name(rng))}/") + "/" + _enc(name)
    else:
        target = f"{path}/{_enc(name)}"
    media = "application/merge-patch+json" if method == "PATCH" else "application/json"
    payload = json.dumps(body).encode() if method != "GET" else None
    return Req("names", method, target, {}, payload, media)


def gen_selectors(rng: random.Random) -> Req:
    _, path, _ = _target(rng)
    if rng.random() < 0.3:  # all namespaces
        parts = path.split("/")
        if "namespaces" in parts and parts[-1] != "namespaces":
            i = parts.index("namespaces")
            path = "/".join(parts[:i] + parts[i + 2 :])
    params = {}
    if rng.random() < 0.7:
        params["labelSelector"] = _label_selector(rng)
    if rng.random() < 0.6:
        params["fieldSelector"] = _field_selector(rng)
    params.update(_query(rng, rng.randint(0, 2)))
    params.pop("timeoutSeconds", None)
    return Req("selectors", "GET", path, params, accept=rng.choice(ACCEPTS))


def _json_patch(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return _junk(rng)
    ops = []
    for _ in range(rng.randint(0, 4)):
        op: Obj = {}
        for key in ("op", "path", "value", "from"):
            if rng.random() < 0.85:
                op[key] = (
                    rng.choice(OPS)
                    if key == "op"
                    else rng.choice(POINTERS)
                    if key in ("path", "from")
                    else _junk(rng)
                )
        ops.append(op if rng.random() < 0.95 else _junk(rng))
    return ops


def _merge_patch(rng: random.Random, manifest: Obj, strategic: bool) -> Any:
    patch = _mutate(rng, manifest) if rng.random() < 0.5 else _junk(rng)
    if strategic and isinstance(patch, dict) and rng.random() < 0.6:
        directive = rng.choice(
            [
                ("$patch", rng.choice(["delete", "replace", "merge", "x", 1, None])),
                ("$retainKeys", _junk(rng)),
                ("$setElementOrder/ports", _junk(rng)),
                ("$setElementOrder/containers", [{"name": "c"}, {"name": 1}, "x"]),
                ("$deleteFromPrimitiveList/finalizers", _junk(rng)),
            ]
        )
        spec = patch.setdefault("spec", {})
        if isinstance(spec, dict):
            spec[directive[0]] = directive[1]
            if rng.random() < 0.5:
                spec["ports"] = [{"$patch": rng.choice(["delete", "replace", 3]), "port": 80}]
        else:
            patch[directive[0]] = directive[1]
    return patch


def gen_patch(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    media = rng.choice([*PATCH_MEDIA, "application/json", "text/plain", ""])
    if media == "application/json-patch+json":
        payload = json.dumps(_json_patch(rng)).encode()
    elif media == "application/apply-patch+yaml":
        if rng.random() < 0.5:
            payload = rng.choice(YAML_BODIES).encode()
        else:
            payload = json.dumps(_merge_patch(rng, manifest, False)).encode()
    else:
        payload = json.dumps(
            _merge_patch(rng, manifest, media == "application/strategic-merge-patch+json")
        ).encode()
    params = _query(rng, 0)
    if media == "application/apply-patch+yaml" and rng.random() < 0.8:
        params["fieldManager"] = rng.choice(["fuzz", "", "x" * 200, "名"])
        if rng.random() < 0.3:
            params["force"] = rng.choice(QUERY_VALUES)
    if rng.random() < 0.2:
        params.update(_query(rng, 1))
    params.pop("timeoutSeconds", None)
    return Req("patch", "PATCH", _obj_path(rng, path, manifest), params, payload, media)


def gen_query(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    method = rng.choice(["GET", "GET", "POST", "PUT", "PATCH", "DELETE"])
    target = path if method in ("POST", "GET") and rng.random() < 0.6 else f"{path}/s0"
    body = None
    if method in ("POST", "PUT"):
        obj = copy.deepcopy(manifest)
        obj["metadata"]["name"] = "s0" if method == "PUT" else f"q{rng.randrange(10**6)}"
        body = json.dumps(obj).encode()
    elif method == "PATCH":
        body = b'{"metadata":{"labels":{"q":"1"}}}'
    params = _query(rng, rng.randint(1, 5))
    params.pop("timeoutSeconds", None)  # a GET with it would not be a watch anyway
    media = "application/merge-patch+json" if method == "PATCH" else "application/json"
    return Req("query", method, target, params, body, media)


def gen_update(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    body = _mutate(rng, manifest) if rng.random() < 0.7 else _junk(rng)
    if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
        body["metadata"]["resourceVersion"] = rng.choice(["", "1", "abc", "-1", 10**30, None, 7])
        if rng.random() < 0.1:
            body["metadata"]["name"] = "other"
    return Req(
        "update",
        "PUT",
        _obj_path(rng, path, manifest),
        _query(rng, rng.randint(0, 1)),
        json.dumps(body).encode(),
        rng.choice(["application/json", "application/yaml", "application/merge-patch+json"]),
    )


def gen_delete(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    opts: Any = {
        "kind": rng.choice(["DeleteOptions", "Foo", 1]),
        "apiVersion": rng.choice(["v1", "meta.k8s.io/v1", "x"]),
    }
    for key in ("propagationPolicy", "gracePeriodSeconds", "preconditions", "dryRun", "orphan"):
        if rng.random() < 0.4:
            opts[key if key != "orphan" else "orphanDependents"] = (
                {"uid": _junk(rng), "resourceVersion": _junk(rng)}
                if key == "preconditions" and rng.random() < 0.7
                else _junk(rng)
            )
    if rng.random() < 0.15:
        opts = _junk(rng)
    collection = rng.random() < 0.15  # deletecollection, with a selector most of the time
    target = path if collection else _obj_path(rng, path, manifest)
    params = _query(rng, rng.randint(0, 2))
    if collection and rng.random() < 0.8:
        params["labelSelector"] = _label_selector(rng)
    params.pop("timeoutSeconds", None)
    payload = json.dumps(opts).encode() if rng.random() < 0.8 else None
    return Req("delete", "DELETE", target, params, payload, "application/json")


def gen_watch(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    params = {"watch": rng.choice(["true", "1", "yes", "false", ""])}
    params.update(_query(rng, rng.randint(0, 3)))
    if rng.random() < 0.5:
        params["resourceVersion"] = rng.choice(["0", "1", "abc", "-1", "99999999999", str(2**63)])
    target = path
    if rng.random() < 0.3:
        parts = path.split("/")
        target = "/".join([*parts[:3], "watch", *parts[3:]])
    elif rng.random() < 0.2:
        target = _obj_path(rng, path, manifest)
    return Req("watch", "GET", target, params, watch=True)


def gen_random_path(rng: random.Random) -> Req:
    segs = [rng.choice(PATH_SEGMENTS) for _ in range(rng.randint(0, 8))]
    if rng.random() < 0.3:
        segs.insert(rng.randrange(len(segs) + 1), _enc(_weird_name(rng))[:300])
    path = "/" + "/".join(segs)
    method = rng.choice(METHODS)
    body = None
    if method not in ("GET", "HEAD") and rng.random() < 0.6:
        body = json.dumps(_junk(rng)).encode()
    media = rng.choice(OTHER_MEDIA + PATCH_MEDIA)
    return Req("random-path", method, path, _query(rng), body, media, accept=rng.choice(ACCEPTS))


def gen_raw_bodies(rng: random.Random) -> Req:
    _, path, manifest = _target(rng)
    roll = rng.random()
    if roll < 0.25:
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    elif roll < 0.4:
        depth = rng.choice([100, 900, 5000, 100_000])
        payload = b"[" * depth + b"]" * depth
    elif roll < 0.5:
        depth = rng.choice([100, 2000, 50_000])
        payload = b'{"a":' * depth + b"1" + b"}" * depth
    elif roll < 0.6:
        payload = b'{"metadata":{"name":"big"},"data":{"k":"' + b"x" * (3 * 1024 * 1024) + b'"}}'
    elif roll < 0.7:
        payload = json.dumps(manifest).encode("utf-16")
    elif roll < 0.8:
        payload = b'{"metadata":{"name":"dup","name":"dup2"},"a":NaN,"b":Infinity}'
    elif roll < 0.9:
        payload = b"- " * 2000 + b"a"  # deeply nested YAML lists
    else:
        payload = b"\xef\xbb\xbf" + json.dumps(manifest).encode()  # BOM
    method = rng.choice(["POST", "PUT", "PATCH", "DELETE"])
    target = path if method == "POST" else _obj_path(rng, path, manifest)
    media = rng.choice(OTHER_MEDIA + PATCH_MEDIA)
    return Req("raw-bodies", method, target, {}, payload, media)


FAMILIES: list[tuple[Callable[[random.Random], Req], int]] = [
    (gen_create_junk, 10),
    (gen_create_mutated, 14),
    (gen_names, 10),
    (gen_selectors, 10),
    (gen_patch, 18),
    (gen_query, 10),
    (gen_update, 8),
    (gen_delete, 6),
    (gen_watch, 4),
    (gen_random_path, 8),
    (gen_raw_bodies, 2),
]


def _allowed_5xx(status: int, out: Any) -> bool:
    # Upstream's own 5xx verdicts on input: 500 when a Service allocator's range is
    # exhausted, and 504 "Too large resource version" (reason Timeout) for a list at a
    # resourceVersion the store has not reached, which client-go's reflector relies on.
    text = str(out)
    return (status == 500 and "range is full" in text) or (
        status == 504 and "Too large resource version" in text
    )


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_family: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[tuple[Any, ...]] = field(default_factory=list)
    client_errors: Counter[str] = field(default_factory=Counter)


async def _send(h: Harness, req: Req) -> tuple[int, Any]:
    headers: dict[str, str] = {}
    if req.body is not None:
        # Without one aiohttp would send application/octet-stream: a 415 for everything.
        headers["Content-Type"] = (
            req.content_type if req.content_type is not None else ("application/json")
        )
    if req.accept is not None:
        headers["Accept"] = req.accept
    url = h.base + req.path
    timeout = aiohttp.ClientTimeout(total=20)
    async with h.session.request(
        req.method, url, params=req.params, data=req.body, headers=headers, timeout=timeout
    ) as resp:
        if req.watch and resp.status == 200:
            return resp.status, None  # a stream: the status line is the verdict
        text = await resp.text(errors="replace")
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text[:300]


async def _reseed(h: Harness) -> None:
    for path, manifest in MANIFESTS.values():
        await h.call("POST", path, manifest)
    await h.call(
        "POST", MANIFESTS["services"][0], {**MANIFESTS["services"][1], "metadata": {"name": "s0"}}
    )


async def _worker(h: Harness, rng: random.Random, count: int, tally: Tally) -> None:
    gens = [g for g, _ in FAMILIES]
    weights = [w for _, w in FAMILIES]
    for i in range(count):
        if i % RESEED_EVERY == 0:
            await _reseed(h)
        req = rng.choices(gens, weights)[0](rng)
        try:
            status, out = await _send(h, req)
        except (aiohttp.ClientError, ValueError) as exc:
            # The client refused to send it (an invalid URL or header), or the server
            # closed a connection on a request it could not parse; neither is a 5xx.
            tally.client_errors[type(exc).__name__] += 1
            continue
        tally.sent += 1
        tally.statuses[status] += 1
        tally.by_family[(req.family, status)] += 1
        if status >= 500 and not _allowed_5xx(status, out):
            tally.failures.append(
                (
                    req.family,
                    req.method,
                    req.path[:200],
                    req.params,
                    req.content_type,
                    (req.body or b"")[:300],
                    status,
                    out,
                )
            )


def _where(record: logging.LogRecord) -> str:
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return f"{record.getMessage()[:200]} at {where}"


def test_ten_thousand_bad_requests_never_5xx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kproxy.apiserver")
    tally = Tally()
    started = time.monotonic()

    async def body(h: Harness) -> None:
        per = -(-REQUESTS // WORKERS)
        await asyncio.gather(
            *(_worker(h, random.Random(SEED + i), per, tally) for i in range(WORKERS))
        )
        # Still up and still correct after all that.
        status, out = await h.call("GET", "/healthz")
        assert status == 200, (status, out)
        cm = {"metadata": {"name": "after-fuzz"}, "data": {"ok": "yes"}}
        created = await h.ok("POST", "/api/v1/namespaces/default/configmaps", cm)
        got = await h.ok("GET", "/api/v1/namespaces/default/configmaps/after-fuzz")
        assert got["data"] == {"ok": "yes"}
        assert got["metadata"]["uid"] == created["metadata"]["uid"]

    run(body, tmp_path, "sqlite", timeout=240)
    elapsed = time.monotonic() - started
    families = sorted({f for f, _ in tally.by_family})
    lines = [
        f"\nfuzz: {tally.sent} requests in {elapsed:.1f} s (seed {SEED}, {WORKERS} workers); "
        f"refused client-side or dropped: {dict(tally.client_errors)}",
        "status histogram: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items())),
    ]
    for fam in families:
        row = {s: n for (f, s), n in sorted(tally.by_family.items()) if f == fam}
        lines.append(f"  {fam:15} {row}")
    print("\n".join(lines))
    unexpected = {_where(r) for r in caplog.records if "unexpected error" in r.getMessage()}
    for failure in tally.failures[:20]:
        print("5xx:", failure)
    assert not tally.failures, (tally.failures[:5], sorted(unexpected)[:5])
    assert tally.sent >= 10_000
    crashes = {_where(r) for r in caplog.records if API_CRASH in r.getMessage()}
    for crash in sorted(crashes):
        warnings.warn(crash, stacklevel=1)
