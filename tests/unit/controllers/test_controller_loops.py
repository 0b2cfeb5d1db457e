"""Controllers against the in-memory fake apiserver (loopback): slices, stale leases, CIDRs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import RestClient
from kproxy.controllers.manager import run_controller_manager
from kproxy.controllers.nodelifecycle import UNREACHABLE
from tests.unit.client.fake_apiserver import FakeApiServer

Obj = dict[str, Any]
RESOURCES = [
    ("pods", "Pod", "v1"),
    ("services", "Service", "v1"),
    ("nodes", "Node", "v1"),
    ("endpoints", "Endpoints", "v1"),
    ("events", "Event", "v1"),
    ("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
    ("leases", "Lease", "coordination.k8s.io/v1"),
]


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def run(body: Callable[[FakeApiServer], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        server = FakeApiServer()
        for plural, kind, api_version in RESOURCES:
            server.register(plural, kind, api_version)
        async with server.serve() as url, RestClient(ClientConfig(server=url)) as client:
            await body(server)  # the initial objects, before the manager lists
            task = asyncio.create_task(
                run_controller_manager(
                    client, controllers=["endpointslice", "nodelifecycle", "nodeipam"], **options
                )
            )
            try:
                async with asyncio.timeout(30):
                    await body.after(server)  # type: ignore[attr-defined]
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def node(name: str, **extra: Any) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": dict(extra),
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod(name: str, ip: str, node_name: str = "n1", ready: bool = True, **spec: Any) -> Obj:
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "nodeName": node_name,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
            **spec,
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def lease(name: str) -> Obj:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
    }


def slices(server: FakeApiServer) -> list[Obj]:
    return list(server.items["endpointslices"].values())


def test_service_gets_a_slice_and_endpoints_updated_in_place() -> None:
    async def setup(server: FakeApiServer) -> None:
        await server.put("nodes", node("n1"))
        port = {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
        spec = {"selector": {"app": "web"}, "clusterIP": "10.96.0.10", "ports": [port]}
        await server.put("services", {"metadata": {"name": "web", "namespace": "default"},
                                      "spec": spec})  # fmt: skip
        await server.put("pods", pod("a", "10.0.0.1"))

    async def after(server: FakeApiServer) -> None:
        await until(lambda: len(slices(server)) == 1 and slices(server)[0]["endpoints"], "a slice")
        [s] = slices(server)
        assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
        assert s["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
        ep = s["endpoints"][0]
        assert (ep["addresses"], ep["zone"], ep["conditions"]["ready"]) == (
            ["10.0.0.1"],
            "z1",
            True,
        )
        assert "endpoints.kubernetes.io/last-change-trigger-time" in s["metadata"]["annotations"]
        await until(lambda: ("default", "web") in server.items["endpoints"], "Endpoints")
        name = s["metadata"]["name"]
        # Readiness flips: the same slice is updated, no new one appears.
        await server.put("pods", pod("a", "10.0.0.1", ready=False))
        await until(
            lambda: not slices(server)[0]["endpoints"][0]["conditions"]["ready"], "not ready"
        )
        assert [x["metadata"]["name"] for x in slices(server)] == [name]
        subsets = server.items["endpoints"][("default", "web")]["subsets"]
        await until(
            lambda: (
                "notReadyAddresses" in server.items["endpoints"][("default", "web")]["subsets"][0]
            ),
            f"Endpoints notReadyAddresses (have {subsets})",
        )
        # The service goes: its slices and Endpoints go too.
        await server.remove("services", "default", "web")
        await until(lambda: not slices(server), "slices deleted")
        await until(lambda: not server.items["endpoints"], "Endpoints deleted")

    setup.after = after  # type: ignore[attr-defined]
    run(setup)


def test_stale_lease_taints_node_marks_pods_and_evicts() -> None:
    async def setup(server: FakeApiServer) -> None:
        await server.put("nodes", node("n1"))
        await server.put("leases", lease("n1"))
        await server.put("pods", pod("doomed", "10.0.0.1"))
        forever = [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]
        await server.put("pods", pod("stays", "10.0.0.2", tolerations=forever))

    def taints() -> set[tuple[str, str]]:
        n = server_ref[0].items["nodes"][("", "n1")]
        return {(t["key"], t["effect"]) for t in n["spec"].get("taints") or []}

    server_ref: list[FakeApiServer] = []

    async def after(server: FakeApiServer) -> None:
        server_ref.append(server)
        await until(lambda: (UNREACHABLE, "NoExecute") in taints(), "unreachable taint", 5)
        assert (UNREACHABLE, "NoSchedule") in taints()
        ready = next(c for c in server.items["nodes"][("", "n1")]["status"]["conditions"]
                     if c["type"] == "Ready")  # fmt: skip
        assert (ready["status"], ready["reason"]) == ("Unknown", "NodeStatusUnknown")
        await until(
            lambda: ("default", "doomed") not in server.items["pods"], "doomed pod evicted", 5
        )
        stays = server.items["pods"][("default", "stays")]
        assert stays["status"]["conditions"][0]["status"] == "False"
        # The kubelet comes back: the lease is renewed and the taints go.
        await server.put("leases", lease("n1"))
        await until(lambda: not taints(), "taints removed", 5)
        assert ("default", "stays") in server.items["pods"]

    setup.after = after  # type: ignore[attr-defined]
    run(
        setup,
        node_monitor_grace_period=0.4,
        node_monitor_period=0.05,
        default_toleration_seconds=0.5,
    )


def test_pod_cidrs_allocated_without_reusing_existing() -> None:
    async def setup(server: FakeApiServer) -> None:
        await server.put("nodes", node("old", podCIDR="10.244.0.0/24", podCIDRs=["10.244.0.0/24"]))
        await server.put("nodes", node("new"))

    async def after(server: FakeApiServer) -> None:
        await until(lambda: server.items["nodes"][("", "new")]["spec"].get("podCIDR"), "a CIDR")
        assert server.items["nodes"][("", "new")]["spec"]["podCIDRs"] == ["10.244.1.0/24"]
        await server.put("nodes", node("third"))
        await until(lambda: server.items["nodes"][("", "third")]["spec"].get("podCIDR"), "3rd")
        assert server.items["nodes"][("", "third")]["spec"]["podCIDR"] == "10.244.2.0/24"

    setup.after = after  # type: ignore[attr-defined]
    run(setup, cluster_cidr="10.244.0.0/16", node_monitor_grace_period=60.0)
