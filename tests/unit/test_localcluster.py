"""kproxy.localcluster without root: flags, prefixes, waits, and that every network
verb it would run names one of its own namespaces (never the root namespace)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kproxy.cli import build_parser
from kproxy.kernel import clusternet as topology
from kproxy.localcluster import command, processes
from kproxy.localcluster.errors import ClusterError, ComponentExited, WaitTimeout
from kproxy.localcluster.waits import wait_for
from kproxy.proxy.config import MODES


def test_cluster_up_offers_every_proxy_mode() -> None:
    assert tuple(command.PROXY_MODES) == tuple(MODES)


def test_cluster_up_flags() -> None:
    args = build_parser().parse_args(
        ["cluster", "up", "--nodes", "3", "--proxy-mode", "userspace", "--for", "5"]
    )
    assert (args.nodes, args.proxy_mode, args.duration) == (3, "userspace", 5.0)
    assert args.func is command.run_up
    for bad in (["--nodes", "0"], ["--proxy-mode", "nope"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["cluster", "up", *bad])
    args = build_parser().parse_args(["cluster", "down", "kpcluster-1-"])
    assert (args.func, args.prefix) == (command.run_down, "kpcluster-1-")


@pytest.mark.parametrize("prefix", ["", "../x-", "a/b-", "-x", "a b"])
def test_prefix_must_be_a_plain_name(prefix: str) -> None:
    with pytest.raises(ClusterError):
        topology.check_prefix(prefix)


def test_unclaimed_topology_destroys_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topology, "list_netns", lambda prefix="": [f"{prefix}hub"])
    with pytest.raises(ClusterError, match="already in use"):
        topology.Topology("kpx-1-").claim()
    ran: list[Sequence[str]] = []
    monkeypatch.setattr(topology.subprocess, "run", lambda argv, **kw: ran.append(argv))
    assert topology.Topology("kpx-1-").destroy() == []
    assert ran == []


def test_every_network_verb_names_a_cluster_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(topology, "run", lambda argv, **kw: ran.append(list(argv)) or "")
    monkeypatch.setattr(topology, "list_netns", lambda prefix="": [])
    topo = topology.Topology("kpx-1-")
    topo.claim()
    topo.build_hub()
    nodes = [(*topo.add_node(f"node-{i}", i), f"10.244.{i}.0/24") for i in (1, 2)]
    topo.route_pod_cidrs(nodes)
    ours = {"kpx-1-hub", "kpx-1-node-1", "kpx-1-node-2"}
    assert topo.namespaces == ["kpx-1-hub", "kpx-1-node-1", "kpx-1-node-2"]
    for argv in ran:
        if argv[:3] == ["ip", "netns", "add"]:
            assert argv[3] in ours
        elif argv[0] == "ip":
            assert argv[1] == "-n" and argv[2] in ours, argv
        else:  # nsenter --net=/run/netns/NS -- ... (or ip netns exec NS ...)
            assert any(a.endswith(tuple(ours)) for a in argv[:4]), argv
    # The veth is born in the hub and its peer moved straight into the node.
    assert ["ip", "-n", "kpx-1-hub", "link", "add", "n1", "type", "veth",
            "peer", "name", "eth0", "netns", "kpx-1-node-1"] in ran  # fmt: skip


def test_wait_for_is_bounded_and_stops_on_a_dead_component() -> None:
    assert wait_for("three", iter([0, None, 3]).__next__, timeout=5, interval=0) == 3
    with pytest.raises(WaitTimeout, match="never"):
        wait_for("never", lambda: None, timeout=0.1, interval=0.01)
    calls: list[int] = []

    def dead() -> None:
        calls.append(1)
        raise ComponentExited("apiserver exited")

    with pytest.raises(ComponentExited):
        wait_for("dead", dead, timeout=30, interval=0)
    assert len(calls) == 1


def test_components_run_this_installations_kproxy(tmp_path: Path) -> None:
    argv = processes.proxy_argv("node-1", "10.99.0.11", tmp_path / "kc", "iptables", "nft")
    assert argv[argv.index("--proxy-mode") + 1] == "iptables"
    assert argv[: len(processes.kproxy_argv())] == processes.kproxy_argv()
    assert "10.99.0.11:10256" in argv
