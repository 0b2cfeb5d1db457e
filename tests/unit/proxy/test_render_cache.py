"""The renderer's caches across syncs never change what it renders.

:class:`IPTablesRenderer` keeps per-port strings (SEP names, endpoint strings)
and, for partial syncs, what each unchanged port contributed last time.  A warm
renderer that went through a sequence of syncs must produce exactly what a
fresh renderer produces for the same snapshot — text and every count.
"""

from __future__ import annotations

from typing import Any

from kproxy.proxy.core import ProxyCore
from kproxy.proxy.iptables import IPTablesRenderer
from kproxy.proxy.iptables.render import RenderResult
from tests.unit.proxy.goldens import NODE_NAME, make_service, make_slice, test_options


def _eps(ips: list[str], *, local: int = -1, ready: bool = True) -> list[dict[str, Any]]:
    return [
        {
            "addresses": [ip],
            "conditions": {"ready": ready},
            "nodeName": NODE_NAME if i == local else "other",
        }
        for i, ip in enumerate(ips)
    ]


def _fresh(core: ProxyCore, snap: Any, full: bool, threshold: int) -> RenderResult:
    r = IPTablesRenderer(test_options(large_cluster_threshold=threshold))
    return r.render(snap.services, snap.endpoints, snap.changed, full=full, existing_nat_chains=())


def test_warm_renderer_equals_fresh_renderer() -> None:
    for threshold in (1000, 3):  # with and without large-cluster mode
        core = ProxyCore(NODE_NAME)
        warm = IPTablesRenderer(test_options(large_cluster_threshold=threshold))
        svcs = [
            make_service("ns1", "a", "172.30.0.1"),
            make_service("ns1", "b", "172.30.0.2", type="NodePort", nodePort=30001),
            make_service(
                "ns2",
                "c",
                "172.30.0.3",
                type="NodePort",
                nodePort=30002,
                externalTrafficPolicy="Local",
                sessionAffinity="ClientIP",
            ),
            make_service("ns2", "d", "172.30.0.4", internalTrafficPolicy="Local"),
        ]
        slices = {
            "a": make_slice("ns1", "a", 1, _eps(["10.0.1.1", "10.0.1.2"])),
            "b": make_slice("ns1", "b", 1, _eps(["10.0.2.1"])),
            "c": make_slice("ns2", "c", 1, _eps(["10.0.3.1", "10.0.3.2"], local=1)),
            "d": make_slice("ns2", "d", 1, _eps(["10.0.4.1", "10.0.4.2"], local=0)),
        }
        for s in svcs:
            core.on_service(None, s)
        for es in slices.values():
            core.on_endpoint_slice(None, es)
        steps: list[tuple[str, Any]] = [
            ("full", None),
            ("partial", None),  # nothing changed
            ("partial", make_slice("ns1", "a", 1, _eps(["10.0.1.1", "10.0.1.9"]))),
            ("partial", None),
            ("partial", make_slice("ns2", "c", 1, _eps(["10.0.3.1", "10.0.3.2"], local=0))),
            ("partial", make_slice("ns1", "b", 1, _eps(["10.0.2.1"], ready=False))),
            ("partial", make_slice("ns2", "d", 1, _eps(["10.0.4.1", "10.0.4.2"]))),
            ("full", None),
            ("partial", make_slice("ns1", "a", 1, _eps([f"10.0.1.{i}" for i in range(1, 6)]))),
            ("partial", None),
        ]
        for kind, change in steps:
            if change is not None:
                core.on_endpoint_slice(None, change)
            snap = core.snapshot()
            full = kind == "full"
            got = warm.render(
                snap.services, snap.endpoints, snap.changed, full=full, existing_nat_chains=()
            )
            assert got == _fresh(core, snap, full, threshold), (threshold, kind, change)
