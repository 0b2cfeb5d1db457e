"""LIST (selectors, paging, resourceVersion) and WATCH (RV, selectors, bookmarks, 410)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from tests.unit.apiserver.harness import MANIFESTS, Harness, run

PODS = "/api/v1/namespaces/default/pods"
CMS = "/api/v1/namespaces/default/configmaps"


def _cm(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"n": name}}


def _names(obj: dict[str, Any]) -> list[str]:
    return [i["metadata"]["name"] for i in obj["items"]]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_paging_with_continue(tmp_path: Path, backend: str) -> None:
    async def body(h: Harness) -> None:
        for i in range(23):
            await h.ok("POST", CMS, _cm(f"c{i:02d}", parity=str(i % 2)))
        seen: list[str] = []
        token = ""
        pages = 0
        first_rv = ""
        while True:
            params = {"limit": "5", "labelSelector": "parity=0"}
            if token:
                params["continue"] = token
            page = await h.ok("GET", CMS, params=params)
            first_rv = first_rv or page["metadata"]["resourceVersion"]
            assert page["metadata"]["resourceVersion"] == first_rv  # one snapshot
            seen += _names(page)
            pages += 1
            # writes between pages do not show up in this list
            await h.ok("POST", CMS, _cm(f"late{pages}", parity="0"))
            token = page["metadata"].get("continue", "")
            if not token:
                break
        assert seen == [f"c{i:02d}" for i in range(0, 23, 2)] and pages == 3
        # all-namespaces list and field selectors
        everywhere = await h.ok(
            "GET", "/api/v1/configmaps", params={"fieldSelector": "metadata.name=c03"}
        )
        assert _names(everywhere) == ["c03"]
        other = await h.ok("GET", CMS, params={"fieldSelector": "metadata.namespace!=default"})
        assert other["items"] == []

    run(body, tmp_path, backend)


def test_continue_expired_and_exact_rv(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        for i in range(4):
            await h.ok("POST", CMS, _cm(f"c{i}"))
        page = await h.ok("GET", CMS, params={"limit": "2"})
        rv = page["metadata"]["resourceVersion"]
        await h.ok("DELETE", f"{CMS}/c0")
        old = await h.ok(
            "GET", CMS, params={"resourceVersion": rv, "resourceVersionMatch": "Exact"}
        )
        assert "c0" in _names(old)
        now = await h.ok("GET", CMS, params={"resourceVersion": "0"})
        assert "c0" not in _names(now)
        await h.store.compact(await h.store.current_revision())
        status, err = await h.call("GET", CMS, params={"continue": page["metadata"]["continue"]})
        assert status == 410 and err["reason"] == "Expired", err
        status, err = await h.call(
            "GET", CMS, params={"resourceVersion": rv, "resourceVersionMatch": "Exact"}
        )
        assert status == 410
        status, err = await h.call("GET", CMS, params={"resourceVersion": "999999"})
        assert status == 504

    run(body, tmp_path)


def test_watch_events_after_rv_with_selectors(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.ok("POST", CMS, _cm("before", app="x"))
        listed = await h.ok("GET", CMS)
        rv = listed["metadata"]["resourceVersion"]

        async def writes() -> None:
            await asyncio.sleep(0.2)
            await h.ok("POST", CMS, _cm("a", app="x"))
            await h.ok("POST", CMS, _cm("b", app="y"))  # filtered out
            await h.ok(
                "PATCH",
                f"{CMS}/a",
                {"data": {"z": "1"}},
                content_type="application/merge-patch+json",
            )
            await h.ok(  # leaves the selector → DELETED
                "PATCH",
                f"{CMS}/a",
                {"metadata": {"labels": {"app": "y"}}},
                content_type="application/merge-patch+json",
            )
            await h.ok(  # comes back → ADDED
                "PATCH",
                f"{CMS}/b",
                {"metadata": {"labels": {"app": "x"}}},
                content_type="application/merge-patch+json",
            )
            await h.ok("DELETE", f"{CMS}/b")

        task = asyncio.create_task(writes())
        events = await h.watch_lines(
            CMS, {"resourceVersion": rv, "labelSelector": "app=x"}, count=5
        )
        await task
        got = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
        assert got == [
            ("ADDED", "a"),
            ("MODIFIED", "a"),
            ("DELETED", "a"),
            ("ADDED", "b"),
            ("DELETED", "b"),
        ]
        rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert rvs == sorted(rvs) and rvs[0] > int(rv)

    run(body, tmp_path)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_watch_from_zero_bookmarks_timeout_and_410(tmp_path: Path, backend: str) -> None:
    async def body(h: Harness) -> None:
        await h.ok("POST", CMS, _cm("one"))
        await h.ok("POST", CMS, _cm("two"))
        events = await h.watch_lines(CMS, {"resourceVersion": "0"}, count=2)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "one"),
            ("ADDED", "two"),
        ]
        rv = (await h.ok("GET", CMS))["metadata"]["resourceVersion"]
        events = await h.watch_lines(
            CMS, {"resourceVersion": rv, "allowWatchBookmarks": "true"}, count=1
        )
        assert events[0]["type"] == "BOOKMARK"
        assert set(events[0]["object"]["metadata"]) == {"resourceVersion"}
        # timeoutSeconds ends the stream cleanly
        loop = asyncio.get_running_loop()
        start = loop.time()
        events = await h.watch_lines(CMS, {"resourceVersion": rv, "timeoutSeconds": "1"}, count=9)
        assert events == [] and loop.time() - start < 5
        # too old → HTTP 200 + one ERROR event with a 410 Status
        await h.ok("POST", CMS, _cm("three"))
        await h.store.compact(await h.store.current_revision())
        events = await h.watch_lines(CMS, {"resourceVersion": "1"}, count=9)
        assert len(events) == 1 and events[0]["type"] == "ERROR"
        assert events[0]["object"]["code"] == 410
        assert events[0]["object"]["reason"] == "Expired"
        # sendInitialEvents ends with the annotated bookmark
        events = await h.watch_lines(
            CMS,
            {
                "sendInitialEvents": "true",
                "allowWatchBookmarks": "true",
                "resourceVersionMatch": "NotOlderThan",
            },
            count=4,
        )
        assert [e["type"] for e in events] == ["ADDED", "ADDED", "ADDED", "BOOKMARK"]
        annotations = events[-1]["object"]["metadata"]["annotations"]
        assert annotations == {"k8s.io/initial-events-end": "true"}

    run(body, tmp_path, backend)


def test_tables(tmp_path: Path) -> None:
    table_accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"

    async def body(h: Harness) -> None:
        path, pod = MANIFESTS["pods"]
        await h.ok("POST", path, pod)
        out = await h.ok("GET", path, headers={"Accept": table_accept})
        assert out["kind"] == "Table"
        cols = [c["name"] for c in out["columnDefinitions"]]
        assert cols[:5] == ["Name", "Ready", "Status", "Restarts", "Age"]
        assert out["rows"][0]["cells"][:4] == ["p1", "0/1", "Pending", 0]
        assert out["rows"][0]["object"]["metadata"]["namespace"] == "default"
        svc_path, svc = MANIFESTS["services"]
        await h.ok("POST", svc_path, svc)
        out = await h.ok("GET", f"{svc_path}/s1", headers={"Accept": table_accept})
        assert out["rows"][0]["cells"][1] == "ClusterIP"
        cm_path, cm = MANIFESTS["configmaps"]
        await h.ok("POST", cm_path, copy.deepcopy(cm))
        out = await h.ok("GET", cm_path, headers={"Accept": table_accept})
        assert [c["name"] for c in out["columnDefinitions"]] == ["Name", "Age"]
        plain = await h.ok("GET", cm_path)
        assert plain["kind"] == "ConfigMapList"

    run(body, tmp_path)
