"""Bad input never answers 500: random paths, methods, bodies, media types and queries."""

from __future__ import annotations

import copy
import json
import logging
import random
import warnings
from pathlib import Path
from typing import Any

import pytest

from kproxy.apiserver.strategy import API_CRASH
from tests.unit.apiserver.harness import MANIFESTS, Harness, run

REQUESTS = 1500
MEDIA = [
    "application/json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
    "application/yaml",
    "text/plain",
    "application/vnd.kubernetes.protobuf",
    "",
]
QUERY_KEYS = [
    "labelSelector",
    "fieldSelector",
    "limit",
    "continue",
    "resourceVersion",
    "resourceVersionMatch",
    "watch",
    "timeoutSeconds",
    "dryRun",
    "gracePeriodSeconds",
    "propagationPolicy",
    "allowWatchBookmarks",
]
SCALARS: list[Any] = [None, 0, -1, 1.5, True, "", "x", "None", [], {}, 2**70, "10.96.0.1", 80]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.4:
        return rng.choice(SCALARS)
    if pick < 0.7:
        return {
            rng.choice(["metadata", "spec", "status", "name", "ports", "$patch", "a"]): _junk(
                rng, depth + 1
            )
            for _ in range(rng.randint(0, 3))
        }
    return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _mutate(rng: random.Random, obj: Any) -> Any:
    """A valid manifest with one random field replaced by junk."""
    obj = copy.deepcopy(obj)
    node = obj
    for _ in range(rng.randint(1, 4)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if rng.random() < 0.4 or not isinstance(node[key], dict | list):
                node[key] = _junk(rng)
                return obj
            node = node[key]
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if rng.random() < 0.5:
                node[i] = _junk(rng)
                return obj
            node = node[i]
    return obj


def _query(rng: random.Random) -> dict[str, str]:
    out = {}
    for key in rng.sample(QUERY_KEYS, rng.randint(0, 3)):
        out[key] = rng.choice(["", "0", "1", "-5", "abc", "a=b", "a in (b", "true", "All", "x,y"])
    out.pop("watch", None)  # watches stream; covered elsewhere
    return out


def _where(record: logging.LogRecord) -> str:
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return f"{record.getMessage()} at {where}"


def test_no_500_for_bad_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="kproxy.apiserver")
    rng = random.Random(20241127)

    async def body(h: Harness) -> None:
        for path, manifest in MANIFESTS.values():
            await h.call("POST", path, manifest)
        failures: list[tuple[Any, ...]] = []
        for _ in range(REQUESTS):
            resource = rng.choice(sorted(MANIFESTS))
            path, manifest = MANIFESTS[resource]
            name = manifest["metadata"]["name"]
            sub = rng.choice(["", "", "", "/status", "/scale", "/binding", "/finalize", "/x/y"])
            target = rng.choice([path, f"{path}/{name}{sub}", f"{path}/other{sub}"])
            method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE"])
            media = rng.choice(MEDIA)
            kind = rng.random()
            if kind < 0.4:
                payload = json.dumps(_mutate(rng, manifest)).encode()
            elif kind < 0.7:
                payload = json.dumps(_junk(rng)).encode()
            elif kind < 0.85:
                payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            else:
                payload = json.dumps(
                    [
                        {
                            "op": rng.choice(["add", "remove", "replace", "move", "test", "x"]),
                            "path": rng.choice(
                                ["/spec", "/metadata/name", "/a/b", "", "/spec/ports/9"]
                            ),
                            "value": _junk(rng),
                            "from": "/metadata",
                        }
                    ]
                ).encode()
            status, out = await h.call(
                method,
                target,
                raw=payload if method != "GET" else None,
                content_type=media,
                params=_query(rng),
            )
            if status >= 500 and not (
                isinstance(out, dict) and "range is full" in str(out.get("message"))
            ):
                failures.append((method, target, media, payload[:200], status, out))
        assert not failures, failures[:5]

    run(body, tmp_path, timeout=300)
    # kproxy.api functions that crashed (answered 422 by the guard): bugs to fix there.
    crashes = {_where(r) for r in caplog.records if API_CRASH in r.getMessage()}
    for crash in sorted(crashes):
        warnings.warn(crash, stacklevel=1)
