"""The IPVS mode's diff sync at 1,000 Services on the guest's real kernel.

One node namespace, the real handles (:class:`~kproxy.kernel.ipvs_batch.IpvsBatch`,
:class:`~kproxy.kernel.ipset.Ipset`, :class:`~kproxy.kernel.links.Links`, legacy
iptables) behind :class:`~kproxy.proxy.ipvs.mode.IpvsMode`, 1,000 ClusterIP Services
with 10 endpoints each, all inside a forked child that joined the namespace:

- the full sync programs 1,000 virtual servers and 10,000 real servers;
- changing ONE endpoint of one Service sends exactly its two operations (add the new
  real server, delete the old one, which has no connections to drain) as two netlink
  messages in one round trip, plus the one destination read of graceful termination,
  and the kernel then holds the new set of real servers for that Service only;
- deleting a Service removes its virtual server, its address on ``kube-ipvs0`` and
  its ``KUBE-CLUSTER-IP`` entry, and nothing else.

Counts are asserted; the timings go to the log only (the bench reports ratios).
"""

from __future__ import annotations

import time
from ipaddress import ip_address
from typing import Any

import pytest

from tests.support.netns import NetnsFactory
from tests.unit.proxy.goldens import make_service, make_slice

pytestmark = pytest.mark.vm

N, EPS = 1000, 10
NODE = "vm-node"


def _vip(i: int) -> str:
    return f"172.20.{i >> 8}.{i & 255}"


def _eps(i: int) -> list[str]:
    return [f"10.{i >> 8}.{i & 255}.{j + 1}" for j in range(EPS)]


def _slice(i: int, ips: list[str]) -> dict[str, Any]:
    return make_slice("ns1", f"svc{i}", 1, [{"addresses": [a]} for a in ips], port=8080)


def _scenario() -> dict[str, Any]:
    """Everything on the kernel, in the namespace; returns what the test asserts."""
    from kproxy.kernel.ipset import Ipset
    from kproxy.kernel.iptables import Iptables
    from kproxy.kernel.ipvs_batch import IpvsBatch
    from kproxy.kernel.links import Links
    from kproxy.proxy.core import ProxyCore
    from kproxy.proxy.ipvs import IpvsOptions
    from kproxy.proxy.ipvs.mode import IpvsMode

    core = ProxyCore(NODE)
    for i in range(N):
        core.on_service(None, make_service("ns1", f"svc{i}", _vip(i)))
        core.on_endpoint_slice(None, _slice(i, _eps(i)))
    core.synced()
    ipvs, ipset, links = IpvsBatch(), Ipset(), Links()
    mode = IpvsMode(ipvs, ipset, links, Iptables("ipv4", "legacy"), IpvsOptions(node_name=NODE))
    out: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        full = mode.sync(core.snapshot(), True)
        out["full_s"] = time.perf_counter() - t
        out["full_ok"], out["full_error"] = full.ok, full.error
        table = ipvs.dump()
        out["services"] = len(table)
        out["destinations"] = sum(len(d) for d in table.values())

        # One endpoint of svc7 replaced.
        before = {str(vs): sorted(map(str, d)) for vs, d in table.items()}
        new_eps = [*_eps(7)[:-1], "10.200.0.7"]
        core.on_endpoint_slice(_slice(7, _eps(7)), _slice(7, new_eps))
        sent0 = ipvs.messages_sent
        t = time.perf_counter()
        partial = mode.sync(core.snapshot(), False)
        out["partial_s"] = time.perf_counter() - t
        stats = mode.last_stats
        out["partial_ok"], out["partial_full"] = partial.ok, stats.full
        out["ops"] = [str(op) for op in stats.ops]
        out["messages"], out["round_trips"] = stats.messages, stats.round_trips
        out["destination_dumps"] = stats.destination_dumps
        out["handle_messages"] = ipvs.messages_sent - sent0
        after = {str(vs): sorted(map(str, d)) for vs, d in ipvs.dump().items()}
        out["changed_services"] = sorted(k for k in after if after[k] != before.get(k))
        out["svc7"] = after.get(f"{_vip(7)}:80/TCP")

        # svc9 deleted.
        core.on_service(make_service("ns1", "svc9", _vip(9)), None)
        core.on_endpoint_slice(_slice(9, _eps(9)), None)
        deleted = mode.sync(core.snapshot(), False)
        stats = mode.last_stats
        out["delete_ok"] = deleted.ok
        out["delete_ops"] = [str(op) for op in stats.ops]
        left = ipvs.dump()
        out["svc9_left"] = any(str(vs.address) == _vip(9) for vs in left)
        out["services_after_delete"] = len(left)
        bound = links.list_addresses("ipv4")
        out["svc9_bound"] = ip_address(_vip(9)) in bound
        out["svc8_bound"] = ip_address(_vip(8)) in bound
        cluster_ips = ipset.list_entries("KUBE-CLUSTER-IP")
        out["svc9_entry"] = f"{_vip(9)},tcp:80" in cluster_ips
        out["cluster_ip_entries"] = len(cluster_ips)
        mode.cleanup()
    finally:
        mode.close()
    return out


def test_one_endpoint_change_among_1000_services_is_two_messages_in_one_round_trip(
    netns: NetnsFactory,
) -> None:
    node = netns()
    out = node.call(_scenario, timeout=600)
    print(
        f"ipvs diff sync at {N} Services x {EPS}: full {out['full_s']:.2f} s, "
        f"one endpoint {out['partial_s']:.3f} s"
    )
    assert out["full_ok"], out["full_error"]
    assert (out["services"], out["destinations"]) == (N, N * EPS)

    assert out["partial_ok"] and not out["partial_full"]
    assert sorted(out["ops"]) == [
        f"add-destination {_vip(7)}:80/TCP 10.200.0.7:8080",
        f"delete-destination {_vip(7)}:80/TCP {_eps(7)[-1]}:8080",
    ]
    assert (out["messages"], out["round_trips"]) == (2, 1)
    # Graceful termination reads the changed service's counters once, and nothing else
    # went over the IPVS socket.
    assert out["destination_dumps"] == 1
    assert out["handle_messages"] == out["messages"] + out["destination_dumps"]
    assert out["changed_services"] == [f"{_vip(7)}:80/TCP"]
    assert out["svc7"] == sorted(f"{ip}:8080" for ip in [*_eps(7)[:-1], "10.200.0.7"])

    assert out["delete_ok"]
    assert out["delete_ops"] == [f"delete-service {_vip(9)}:80/TCP"]
    assert not out["svc9_left"] and out["services_after_delete"] == N - 1
    assert not out["svc9_bound"] and out["svc8_bound"]
    assert not out["svc9_entry"] and out["cluster_ip_entries"] == N - 1
