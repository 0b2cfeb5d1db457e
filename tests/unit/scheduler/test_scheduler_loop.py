"""The scheduler loop against the in-memory fake apiserver (loopback): bind, events, retry."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import RestClient
from kproxy.scheduler.scheduler import run_scheduler
from tests.unit.client.fake_apiserver import FakeApiServer, status

Obj = dict[str, Any]


class BindingApiServer(FakeApiServer):
    """The fake plus ``POST pods/{name}/binding`` (nodeName once; 409 after)."""

    def __init__(self) -> None:
        super().__init__()
        self.bindings: list[tuple[str, str]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if request.method != "POST" or route is None or route[3] != "binding":
            return await super()._handle(request)
        _, ns, name, _ = route
        body = json.loads(await request.read())
        pod = self.items["pods"].get((ns, name))
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found')
        if pod["spec"].get("nodeName"):
            return status(409, "Conflict", f"pod {name} is already assigned")
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = body["target"]["name"]
        await self.put("pods", new)
        self.bindings.append((name, body["target"]["name"]))
        return web.json_response({"kind": "Status", "status": "Success", "code": 201}, status=201)


def node(name: str, cpu: str = "2", **labels: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def pod(name: str, cpu: str = "100m", **spec: Any) -> Obj:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}],
            "schedulerName": "default-scheduler",
            **spec,
        },
        "status": {"phase": "Pending"},
    }


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def run(body: Callable[[BindingApiServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = BindingApiServer()
        for plural, kind in (("pods", "Pod"), ("nodes", "Node"), ("namespaces", "Namespace"),
                             ("events", "Event")):  # fmt: skip
            server.register(plural, kind, "v1")
        async with server.serve() as url, RestClient(ClientConfig(server=url)) as client:
            task = asyncio.create_task(
                run_scheduler(
                    client, seed=1, initial_backoff=0.05, max_backoff=0.2, flush_interval=0.5
                )
            )
            try:
                async with asyncio.timeout(30):
                    await body(server)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def events(server: FakeApiServer, reason: str) -> list[Obj]:
    return [e for e in server.items["events"].values() if e.get("reason") == reason]


def test_pod_is_bound_to_the_node_that_fits() -> None:
    async def body(server: BindingApiServer) -> None:
        await server.put("nodes", node("small", cpu="500m"))
        await server.put("nodes", node("big", cpu="4"))
        await server.put("pods", pod("p", cpu="1"))
        await until(lambda: server.bindings == [("p", "big")], "p bound to big")
        await until(lambda: bool(events(server, "Scheduled")), "a Scheduled event")
        assert server.items["pods"][("default", "p")]["spec"]["nodeName"] == "big"
        # Pods of another scheduler are not ours.
        await server.put("pods", pod("other", schedulerName="someone-else"))
        await asyncio.sleep(0.3)
        assert [b for b in server.bindings if b[0] == "other"] == []

    run(body)


def test_unschedulable_pod_gets_event_and_is_retried_when_nodes_change() -> None:
    async def body(server: BindingApiServer) -> None:
        await server.put("nodes", node("n1"))
        await server.put("nodes", node("n2", cpu="100m"))
        await server.put("pods", pod("q", cpu="200m", nodeSelector={"disk": "ssd"}))
        await until(lambda: bool(events(server, "FailedScheduling")), "FailedScheduling event")
        event = events(server, "FailedScheduling")[0]
        assert event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "q"
        assert event["message"] == (
            "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
        )
        await until(
            lambda: any(
                c.get("reason") == "Unschedulable"
                for c in server.items["pods"][("default", "q")]["status"].get("conditions", [])
            ),
            "PodScheduled=False",
        )
        assert server.bindings == []
        # n2 gets the label but has too little cpu; n1 then gets it too.
        await server.put("nodes", node("n2", cpu="100m", disk="ssd"))
        await until(lambda: len(events(server, "FailedScheduling")) >= 2, "a second failure")
        assert "Insufficient cpu" in events(server, "FailedScheduling")[-1]["message"]
        await server.put("nodes", node("n1", disk="ssd"))
        await until(lambda: server.bindings == [("q", "n1")], "q bound to n1 after the change")

    run(body)


def test_assumed_pods_prevent_overcommit() -> None:
    async def body(server: BindingApiServer) -> None:
        await server.put("nodes", node("only", cpu="1"))
        for i in range(3):
            await server.put("pods", pod(f"p{i}", cpu="400m"))
        await until(lambda: len(server.bindings) == 2, "two pods fit")
        await asyncio.sleep(0.3)
        assert len(server.bindings) == 2
        await until(lambda: bool(events(server, "FailedScheduling")), "the third fails")
        assert "1 Insufficient cpu" in events(server, "FailedScheduling")[0]["message"]

    run(body)
