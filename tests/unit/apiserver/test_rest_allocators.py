"""ClusterIP and NodePort allocation through the REST surface, incl. shared stores."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

from kproxy.store import MemoryStore, SqliteStore
from tests.unit.apiserver.harness import Harness, apiserver, run

SVCS = "/api/v1/namespaces/default/services"


def _svc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80}], **spec},
    }


def test_cluster_ips(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        net = ipaddress.ip_network("10.100.0.0/28")
        a = await h.ok("POST", SVCS, _svc("a"))
        ip = a["spec"]["clusterIP"]
        assert ipaddress.ip_address(ip) in net and a["spec"]["clusterIPs"] == [ip]
        assert a["spec"]["ipFamilies"] == ["IPv4"]
        status, err = await h.call("POST", SVCS, _svc("b", clusterIP=ip))
        assert status == 422 and "already allocated" in err["message"], err
        status, err = await h.call("POST", SVCS, _svc("c", clusterIP="10.200.0.1"))
        assert status == 422 and "not in the valid range" in err["message"]
        headless = await h.ok("POST", SVCS, _svc("h", clusterIP="None"))
        assert headless["spec"]["clusterIP"] == "None"
        ext = await h.ok(
            "POST",
            SVCS,
            {
                "metadata": {"name": "e"},
                "spec": {"type": "ExternalName", "externalName": "x.example"},
            },
        )
        assert "clusterIP" not in ext["spec"]
        # a PUT without the clusterIP keeps it; changing it is immutable
        put = _svc("a")
        put["metadata"]["resourceVersion"] = a["metadata"]["resourceVersion"]
        kept = await h.ok("PUT", f"{SVCS}/a", put)
        assert kept["spec"]["clusterIP"] == ip
        # delete releases the IP: it can be asked for again
        await h.ok("DELETE", f"{SVCS}/a")
        again = await h.ok("POST", SVCS, _svc("b", clusterIP=ip))
        assert again["spec"]["clusterIP"] == ip
        # the /28 holds 14 addresses; 1 taken; fill it up, then it is full (not a 4xx blame)
        for i in range(13):
            await h.ok("POST", SVCS, _svc(f"f{i}"))
        status, err = await h.call("POST", SVCS, _svc("full"))
        assert status == 500 and "range is full" in err["message"]
        assert (await h.call("GET", f"{SVCS}/full"))[0] == 404

    run(body, tmp_path, service_cluster_ip_range="10.100.0.0/28")


def test_node_ports(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        svc = await h.ok("POST", SVCS, _svc("np", type="NodePort"))
        port = svc["spec"]["ports"][0]["nodePort"]
        assert 30000 <= port <= 30010
        status, err = await h.call(
            "POST", SVCS, _svc("np2", type="NodePort", ports=[{"port": 80, "nodePort": port}])
        )
        assert status == 422 and "provided port is already allocated" in err["message"], err
        status, err = await h.call(
            "POST", SVCS, _svc("np3", type="NodePort", ports=[{"port": 80, "nodePort": 31000}])
        )
        assert status == 422 and "valid range" in err["message"]
        # switching to ClusterIP releases the node port
        svc["spec"]["type"] = "ClusterIP"
        svc["spec"]["ports"][0].pop("nodePort")
        await h.ok("PUT", f"{SVCS}/np", svc)
        took = await h.ok(
            "POST", SVCS, _svc("np2", type="NodePort", ports=[{"port": 80, "nodePort": port}])
        )
        assert took["spec"]["ports"][0]["nodePort"] == port
        # strategic patch to add a port keeps the existing node port
        out = await h.ok(
            "PATCH",
            f"{SVCS}/np2",
            {"spec": {"ports": [{"port": 81, "name": "b"}, {"port": 80, "name": "a"}]}},
            content_type="application/strategic-merge-patch+json",
        )
        ports = {p["port"]: p["nodePort"] for p in out["spec"]["ports"]}
        assert ports[80] == port and ports[81] != port
        await h.ok("DELETE", f"{SVCS}/np2")
        used = await h.server.allocators.ports.used()
        assert used == set()

    run(body, tmp_path, service_node_port_range=(30000, 30010))


def test_allocations_survive_restart_and_shared_store(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(tmp_path / "db")
        try:
            async with apiserver(tmp_path, store=store) as h:
                first = await h.ok("POST", SVCS, _svc("a", type="NodePort"))
            # the allocation key is gone (as if written by an older server): repair rebuilds it
            await store.delete("/registry/ranges/serviceips")
            async with apiserver(tmp_path, store=store) as h:
                used = await h.server.allocators.ips.used()
                assert int(ipaddress.ip_address(first["spec"]["clusterIP"])) in used
                status, _ = await h.call(
                    "POST", SVCS, _svc("b", clusterIP=first["spec"]["clusterIP"])
                )
                assert status == 422
        finally:
            await store.close()

        # two apiservers over one store never hand out the same IP
        shared = MemoryStore()
        try:
            async with (
                apiserver(tmp_path / "one", store=shared) as h1,
                apiserver(tmp_path / "two", store=shared) as h2,
            ):
                made = await asyncio.gather(
                    *((h1 if i % 2 else h2).ok("POST", SVCS, _svc(f"s{i}")) for i in range(30))
                )
                ips = [m["spec"]["clusterIP"] for m in made]
                assert len(set(ips)) == 30
        finally:
            await shared.close()

    asyncio.run(asyncio.wait_for(main(), 60))
