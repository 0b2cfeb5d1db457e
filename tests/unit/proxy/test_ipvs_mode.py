"""The IPVS applier against the stateful fakes: diffs, counted operations, graceful termination.

The fake kernel is :class:`FakeIpvs` behind :class:`IpvsOneByOne` (the fake of
:class:`~kproxy.kernel.ipvs_batch.IpvsBatch`: same results, a message counted per
operation), :class:`FakeIpset`, :class:`FakeLinks` and :class:`FakeIptables`.
The fakes carry no traffic, so connection counters are poked into the fake IPVS
table where a test needs a busy real server.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from kproxy.kernel.fakes.ipset import FakeIpset
from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.kernel.fakes.ipvs import FakeIpvs
from kproxy.kernel.fakes.links import FakeLinks
from kproxy.kernel.iptables import IptablesError
from kproxy.kernel.ipvs import IPProtocol, IpvsError, RealServer, VirtualServer
from kproxy.kernel.ipvs_batch import ApplyResult, IpvsOneByOne, IpvsOp, OpFailure, OpKind
from kproxy.proxy.core import ProxyCore
from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.ipvs import IpvsOptions
from kproxy.proxy.ipvs.graceful import GracefulTermination
from kproxy.proxy.ipvs.mode import IpvsMode, host_kernel_version
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import Mode, SyncResult
from kproxy.proxy.proxier import Proxier
from tests.unit.proxy.goldens import NODE_NAME, make_service, make_slice

ip = ip_address
NODE_IP = "192.168.0.2"


def vip(i: int) -> str:
    return f"172.30.{i >> 8}.{i & 255}"


def vs_of(i: int, port: int = 80, proto: str = "TCP") -> VirtualServer:
    return VirtualServer(ip(vip(i)), port, IPProtocol[proto])


class Rig:
    """``n`` Services (svc0..) with ``eps`` endpoints each, the fakes, the mode and the loop."""

    def __init__(
        self,
        n: int = 2,
        eps: int = 2,
        *,
        protocol: str = "TCP",
        exclude: tuple[str, ...] = (),
        ipvs: FakeIpvs | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.now = [1000.0]
        self.fake_ipvs = ipvs or FakeIpvs()
        self.bulk = IpvsOneByOne(self.fake_ipvs)
        self.ipset = FakeIpset()
        self.links = FakeLinks()
        self.links.state.node_addresses = {ip(NODE_IP), ip("127.0.0.1")}
        self.ipt = FakeIptables()
        self.metrics = ProxyMetrics()
        self.sysctls: dict[str, str] = {}
        self.protocol = protocol
        options = IpvsOptions(
            node_name=NODE_NAME,
            node_ip=ip(NODE_IP),
            masquerade_mark="0x4000",
            exclude_cidrs=tuple(ip_network(c) for c in exclude),
        )
        self.mode = IpvsMode(
            self.bulk,
            self.ipset,
            self.links,
            self.ipt,
            options,
            self.metrics,
            graceful_timeout=60.0,
            clock=lambda: self.now[0],
            ensure_sysctl=self._sysctl,
            executor=executor,
        )
        self.core = ProxyCore(NODE_NAME)
        self.proxier = Proxier(
            self.core,
            self.mode,
            health=ProxyHealth(60.0),
            metrics=self.metrics,
            clock=lambda: self.now[0],
        )
        self.slices: dict[int, dict[str, Any]] = {}
        for i in range(n):
            self.core.on_service(None, self.service(i))
            self.set_endpoints(i, [f"10.{i >> 8}.{i & 255}.{j + 1}" for j in range(eps)])
        self.core.synced()

    def _sysctl(self, name: str, value: str) -> bool:
        changed = self.sysctls.get(name) != value
        self.sysctls[name] = value
        return changed

    def service(self, i: int, **spec: Any) -> dict[str, Any]:
        return make_service("ns1", f"svc{i}", vip(i), protocol=self.protocol, **spec)

    def set_endpoints(self, i: int, ips: list[str]) -> None:
        new = make_slice(
            "ns1",
            f"svc{i}",
            1,
            [{"addresses": [a]} for a in ips],
            port=8080,
            protocol=self.protocol,
        )
        self.core.on_endpoint_slice(self.slices.get(i), new)
        self.slices[i] = new

    def sync(self) -> SyncResult:
        result = self.proxier.sync_now()
        assert result is not None
        return result

    def dests(self, i: int, port: int = 80) -> dict[str, int]:
        """``ip:port`` → weight of the real servers of service ``i`` in the fake kernel."""
        key = vs_of(i, port, self.protocol).key
        return {str(rs): rs.weight for rs in self.fake_ipvs.state.destinations[key].values()}

    def busy(self, i: int, rs_ip: str, active: int = 1, port: int = 8080) -> None:
        """Give a real server connections (the fakes carry no traffic)."""
        dests = self.fake_ipvs.state.destinations[vs_of(i, proto=self.protocol).key]
        key = (ip(rs_ip), port)
        dests[key] = replace(dests[key], active_connections=active)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


# -- the basics ---------------------------------------------------------------------


def test_mode_satisfies_the_protocol() -> None:
    assert isinstance(Rig().mode, Mode)
    assert Rig().mode.name == "ipvs"


def test_host_kernel_version() -> None:
    assert host_kernel_version("6.1.0-56-amd64") == (6, 1)
    assert host_kernel_version("5.10.0") == (5, 10)
    assert host_kernel_version("weird") is None


def test_first_sync_programs_everything() -> None:
    rig = Rig()
    result = rig.sync()
    assert result.ok and result.full, result.error
    assert rig.mode.last_stats.kernel_read
    # upstream's sysctls, set once
    assert rig.sysctls == {
        "net/ipv4/vs/conntrack": "1",
        "net/ipv4/vs/expire_nodest_conn": "1",
        "net/ipv4/vs/expire_quiescent_template": "1",
        "net/ipv4/ip_forward": "1",
    }
    assert rig.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 1}
    assert rig.dests(1) == {"10.0.1.1:8080": 1, "10.0.1.2:8080": 1}
    assert rig.links.state.exists
    assert rig.links.state.addresses == {ip(vip(0)), ip(vip(1))}
    assert rig.ipset.state.members["KUBE-CLUSTER-IP"] == {
        "172.30.0.0,tcp:80",
        "172.30.0.1,tcp:80",
    }
    assert rig.ipset.state.members["KUBE-IPVS-IPS"] == {"172.30.0.0", "172.30.0.1"}
    assert len(rig.ipset.state.info) == 17
    nat = rig.ipt.save("nat")
    assert '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat
    assert "--match-set KUBE-CLUSTER-IP" in nat
    assert '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER' in (
        rig.ipt.save("filter")
    )
    assert rig.sample("kubeproxy_sync_proxy_rules_iptables_total", table="nat", ip_family="IPv4")


def test_a_resync_without_changes_sends_nothing() -> None:
    rig = Rig()
    rig.sync()
    rig.ipset.requests = 0
    result = rig.sync()
    assert result.ok and not result.full
    stats = rig.mode.last_stats
    assert not stats.kernel_read
    assert stats.ops == () and stats.messages == 0 and stats.destination_dumps == 0
    assert rig.ipset.requests == 0
    assert stats.restores == 1  # the fixed rules are rewritten each sync, as upstream


def test_one_endpoint_change_among_1000_services_sends_only_its_ops() -> None:
    """Acceptance 3: at 1,000 Services, one endpoint replaced = one add + one delete
    (the old server has no connections) and one destination dump of that service."""
    rig = Rig(1000, 2)
    assert rig.sync().ok
    assert rig.mode.last_stats.count(OpKind.ADD_SERVICE) == 1000
    assert rig.mode.last_stats.count(OpKind.ADD_DESTINATION) == 2000
    rig.ipset.requests = 0
    before = rig.bulk.messages_sent
    rig.set_endpoints(500, ["10.1.244.1", "10.1.244.9"])  # 10.1.244.2 → .9
    result = rig.sync()
    assert result.ok and not result.full
    stats = rig.mode.last_stats
    assert [str(op) for op in stats.ops] == [
        "add-destination 172.30.1.244:80/TCP 10.1.244.9:8080",
        "delete-destination 172.30.1.244:80/TCP 10.1.244.2:8080",
    ]
    assert stats.messages == 2 and rig.bulk.messages_sent - before == 2
    assert stats.destination_dumps == 1  # fresh counters of that one service
    assert not stats.kernel_read
    assert rig.ipset.requests == 0  # no set member depends on that endpoint
    assert (stats.bound, stats.unbound) == (0, 0)
    assert rig.dests(500) == {"10.1.244.1:8080": 1, "10.1.244.9:8080": 1}


def test_one_endpoint_change_with_connections_is_one_add_and_one_weight_zero_edit() -> None:
    rig = Rig(1000, 2)
    rig.sync()
    rig.busy(500, "10.1.244.2")
    rig.set_endpoints(500, ["10.1.244.1", "10.1.244.9"])
    assert rig.sync().ok
    stats = rig.mode.last_stats
    assert [(op.kind, str(op.destination)) for op in stats.ops] == [
        (OpKind.ADD_DESTINATION, "10.1.244.9:8080"),
        (OpKind.EDIT_DESTINATION, "10.1.244.2:8080"),
    ]
    assert stats.messages == 2 and stats.destination_dumps == 1
    assert rig.dests(500) == {"10.1.244.1:8080": 1, "10.1.244.2:8080": 0, "10.1.244.9:8080": 1}


def test_a_new_service_is_one_add_plus_its_destinations() -> None:
    rig = Rig(3, 2)
    rig.sync()
    rig.core.on_service(None, rig.service(7))
    rig.set_endpoints(7, ["10.0.7.1", "10.0.7.2"])
    assert rig.sync().ok
    stats = rig.mode.last_stats
    assert [op.kind for op in stats.ops] == [
        OpKind.ADD_SERVICE,
        OpKind.ADD_DESTINATION,
        OpKind.ADD_DESTINATION,
    ]
    assert stats.destination_dumps == 0
    assert ip(vip(7)) in rig.links.state.addresses
    assert "172.30.0.7,tcp:80" in rig.ipset.state.members["KUBE-CLUSTER-IP"]


def test_deleting_a_service_removes_its_virtual_server_address_and_set_entries() -> None:
    rig = Rig(3, 2)
    rig.sync()
    rig.core.on_service(rig.service(1), None)
    rig.core.on_endpoint_slice(rig.slices.pop(1), None)
    assert rig.sync().ok
    stats = rig.mode.last_stats
    assert [str(op) for op in stats.ops] == ["delete-service 172.30.0.1:80/TCP"]
    assert vs_of(1).key not in rig.fake_ipvs.state.services
    assert ip(vip(1)) not in rig.links.state.addresses
    assert stats.unbound == 1
    assert "172.30.0.1,tcp:80" not in rig.ipset.state.members["KUBE-CLUSTER-IP"]
    assert "172.30.0.1" not in rig.ipset.state.members["KUBE-IPVS-IPS"]


def test_a_service_change_edits_the_virtual_server_in_place() -> None:
    rig = Rig(1, 2)
    rig.sync()
    sticky = rig.service(
        0, sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}
    )
    rig.core.on_service(rig.service(0), sticky)
    assert rig.sync().ok
    assert [op.kind for op in rig.mode.last_stats.ops] == [OpKind.EDIT_SERVICE]
    vs = rig.fake_ipvs.state.services[vs_of(0).key]
    assert vs.timeout == 60 and vs.flags == 1


def test_foreign_virtual_servers_are_deleted_except_excluded_ones() -> None:
    fake = FakeIpvs()
    for addr in ("10.50.0.1", "10.99.0.1"):
        fake.add_service(VirtualServer(ip(addr), 80, IPProtocol.TCP))
    fake.add_service(VirtualServer(ip("fd00::1"), 80, IPProtocol.TCP))  # other family
    rig = Rig(1, 1, exclude=("10.99.0.0/16",), ipvs=fake)
    assert rig.sync().ok
    left = {str(vs) for vs in fake.list_services()}
    assert left == {"10.99.0.1:80/TCP", "[fd00::1]:80/TCP", "172.30.0.0:80/TCP"}


# -- graceful termination ------------------------------------------------------------


def test_graceful_termination_waits_for_connections_then_deletes() -> None:
    rig = Rig(1, 2)
    rig.sync()
    rig.busy(0, "10.0.0.2", active=2)
    rig.set_endpoints(0, ["10.0.0.1"])
    rig.sync()
    assert rig.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 0}
    assert len(rig.mode.graceful) == 1
    rig.busy(0, "10.0.0.2", active=2)  # the fake's edit zeroed them; the kernel's does not
    # still busy: the next syncs leave it alone (one counters read each)
    rig.now[0] += 30
    rig.sync()
    assert not rig.mode.last_stats.ops
    assert rig.mode.last_stats.destination_dumps == 1
    # drained: deleted at the next sync
    rig.busy(0, "10.0.0.2", active=0)
    rig.sync()
    assert [str(op) for op in rig.mode.last_stats.ops] == [
        "delete-destination 172.30.0.0:80/TCP 10.0.0.2:8080"
    ]
    assert rig.dests(0) == {"10.0.0.1:8080": 1}
    assert len(rig.mode.graceful) == 0
    rig.sync()
    assert rig.mode.last_stats.destination_dumps == 0  # nothing left to watch


def test_graceful_termination_times_out() -> None:
    rig = Rig(1, 2)
    rig.sync()
    rig.busy(0, "10.0.0.2", active=1)
    rig.set_endpoints(0, ["10.0.0.1"])
    rig.sync()
    rig.busy(0, "10.0.0.2", active=1)
    rig.now[0] += 59
    rig.sync()
    assert rig.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 0}
    rig.now[0] += 1  # graceful_timeout=60 s
    rig.sync()
    assert rig.dests(0) == {"10.0.0.1:8080": 1}


def test_an_endpoint_back_while_draining_gets_its_weight_back() -> None:
    rig = Rig(1, 2)
    rig.sync()
    rig.busy(0, "10.0.0.2", active=1)
    rig.set_endpoints(0, ["10.0.0.1"])
    rig.sync()
    rig.set_endpoints(0, ["10.0.0.1", "10.0.0.2"])
    rig.sync()
    assert [
        (op.kind, op.destination and op.destination.weight) for op in rig.mode.last_stats.ops
    ] == [(OpKind.EDIT_DESTINATION, 1)]
    assert len(rig.mode.graceful) == 0
    rig.busy(0, "10.0.0.2", active=0)
    rig.now[0] += 3600
    rig.sync()
    assert rig.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 1}


def test_udp_real_servers_are_deleted_at_once_without_a_counters_read() -> None:
    rig = Rig(1, 2, protocol="UDP")
    rig.sync()
    rig.busy(0, "10.0.0.2", active=5)
    rig.set_endpoints(0, ["10.0.0.1"])
    rig.sync()
    assert [str(op) for op in rig.mode.last_stats.ops] == [
        "delete-destination 172.30.0.0:80/UDP 10.0.0.2:8080"
    ]
    assert rig.mode.last_stats.destination_dumps == 0


def test_a_deleted_service_drops_its_draining_servers() -> None:
    rig = Rig(2, 2)
    rig.sync()
    rig.busy(0, "10.0.0.2", active=1)
    rig.set_endpoints(0, ["10.0.0.1"])
    rig.sync()
    rig.core.on_service(rig.service(0), None)
    rig.sync()
    assert len(rig.mode.graceful) == 0
    assert vs_of(0).key not in rig.fake_ipvs.state.services


def test_after_a_restart_weights_are_reset_and_leftovers_drained() -> None:
    fake = FakeIpvs()
    first = Rig(1, 2, ipvs=fake)
    first.sync()
    first.busy(0, "10.0.0.2", active=1)
    first.set_endpoints(0, ["10.0.0.1"])
    first.sync()
    assert first.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 0}
    # A planned endpoint left at weight 0 by the dead process (e.g. restored just
    # before it died): the new one must give it weight 1 again.
    vs = vs_of(0)
    fake.set_destination(vs, RealServer(ip("10.0.0.1"), 8080, weight=0))
    first.busy(0, "10.0.0.2", active=1)
    second = Rig(1, 1, ipvs=fake)  # svc0 now has endpoint 10.0.0.1 only
    assert second.sync().ok
    assert second.dests(0) == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 0}
    assert len(second.mode.graceful) == 1  # the leftover drains under the new process
    second.busy(0, "10.0.0.2", active=0)
    second.sync()
    assert second.dests(0) == {"10.0.0.1:8080": 1}


def test_graceful_state_machine_with_a_fake_clock() -> None:
    now = [0.0]
    g = GracefulTermination(timeout=10.0, clock=lambda: now[0])
    vs = VirtualServer(ip("10.96.0.1"), 80, IPProtocol.TCP)
    a = RealServer(ip("10.0.0.1"), 80, active_connections=1)
    b = RealServer(ip("10.0.0.2"), 80)
    d = g.decide(vs, [a, b], {a.key: a, b.key: b})
    assert d.quiesce == (replace(a, weight=0),) and d.delete == (b,)
    assert g.is_draining(vs.key, a.key) and not g.is_draining(vs.key, b.key)
    now[0] = 9.0
    assert g.decide(vs, [], {a.key: a}) == type(d)()
    now[0] = 10.0
    assert g.decide(vs, [], {a.key: a}).delete == (a,)
    assert len(g) == 0 and g.services() == []
    # gone from the kernel meanwhile: just forgotten
    g.decide(vs, [a], {a.key: a})
    assert g.decide(vs, [], {}).delete == ()
    assert len(g) == 0
    # back: cancel
    g.decide(vs, [a], {a.key: a})
    assert g.cancel(vs.key, a.key) and not g.cancel(vs.key, a.key)
    udp = VirtualServer(ip("10.96.0.1"), 53, IPProtocol.UDP)
    assert g.decide(udp, [a], {a.key: a}).delete == (a,)
    with pytest.raises(ValueError):
        GracefulTermination(timeout=-1)


# -- failures --------------------------------------------------------------------------


def test_failed_restore_counts_and_forces_a_full_reread() -> None:
    rig = Rig()
    rig.sync()
    rig.ipt.fail_restores = 1
    rig.set_endpoints(0, ["10.0.0.1"])
    result = rig.mode.sync(rig.core.snapshot(), False)
    assert not result.ok and "injected" in result.error
    assert (
        rig.sample("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family="IPv4")
        == 1
    )
    assert (
        rig.sample(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ip_family="IPv4"
        )
        == 1
    )
    assert rig.mode.need_full
    result = rig.mode.sync(rig.core.snapshot(), False)
    assert result.ok and result.full and rig.mode.last_stats.kernel_read


class FailingOnce(IpvsOneByOne):
    """Refuses every operation of the next ``fail`` non-empty applies (EEXIST)."""

    fail = 0

    def apply(self, ops: Iterable[IpvsOp]) -> ApplyResult:
        ops = list(ops)
        if self.fail and ops:
            self.fail -= 1
            refused = tuple(OpFailure(op, errno.EEXIST) for op in ops)
            return ApplyResult(len(ops), len(ops), refused)
        return super().apply(ops)


def test_failed_ipvs_operations_fail_the_sync_and_reread_the_kernel() -> None:
    rig = Rig(1, 1)
    flaky = FailingOnce(rig.fake_ipvs)
    rig.mode.ipvs = flaky
    flaky.fail = 1
    result = rig.mode.sync(rig.core.snapshot(), True)
    assert not result.ok and "EEXIST" in result.error
    assert rig.mode.need_full
    result = rig.mode.sync(rig.core.snapshot(), False)
    assert result.ok and result.full
    assert rig.dests(0) == {"10.0.0.1:8080": 1}


# -- cleanup and threads -----------------------------------------------------------------


def test_cleanup_leaves_nothing_but_excluded_servers_and_is_idempotent() -> None:
    rig = Rig(2, 2, exclude=("10.99.0.0/16",))
    rig.fake_ipvs.add_service(VirtualServer(ip("10.99.0.1"), 80, IPProtocol.TCP))
    rig.sync()
    rig.mode.cleanup()
    assert [str(vs) for vs in rig.fake_ipvs.list_services()] == ["10.99.0.1:80/TCP"]
    assert not rig.links.state.exists
    assert rig.ipset.state.info == {}
    for table in ("nat", "filter"):
        assert "KUBE-" not in rig.ipt.save(table)
    rig.mode.cleanup()  # idempotent
    # and a sync after a cleanup puts everything back
    assert rig.sync().ok and rig.links.state.exists and rig.dests(0)


def test_syncs_run_on_the_executor_thread() -> None:
    threads: set[int] = set()

    class Recording(IpvsOneByOne):
        def apply(self, ops: Iterable[IpvsOp]) -> ApplyResult:
            threads.add(threading.get_ident())
            return super().apply(ops)

    with ThreadPoolExecutor(max_workers=1) as pool:
        rig = Rig(1, 1, executor=pool)
        rig.mode.ipvs = Recording(rig.fake_ipvs)
        rig.sync()
        worker = pool.submit(threading.get_ident).result()
    assert threads == {worker} and worker != threading.get_ident()


def test_an_ipvs_error_is_a_failed_sync_not_an_exception() -> None:
    rig = Rig(1, 1)

    class Broken(IpvsOneByOne):
        def dump(self) -> Any:
            raise IpvsError("list-services", None, None, 1)

    rig.mode.ipvs = Broken(rig.fake_ipvs)
    result = rig.mode.sync(rig.core.snapshot(), True)
    assert not result.ok and "list-services" in result.error


# -- the fixed rules: one save, one restore -------------------------------------------------


class CountingIptables(FakeIptables):
    """Counts the execs a real backend would run (``iptables-save``, ``-restore``, ``-C``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = self.others = 0  # restores: the fake's own list of inputs

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        self.saves += 1
        return super().save(table, counters=counters)

    def ensure_rule(self, *a: Any) -> bool:
        self.others += 1
        return bool(super().ensure_rule(*a))

    def ensure_chain(self, *a: Any) -> bool:
        self.others += 1
        return bool(super().ensure_chain(*a))


def _jump_lines(ipt: FakeIptables, table: str, chain: str) -> list[str]:
    return [line for line in ipt.save(table).splitlines() if line.startswith(f"-A {chain} ")]


def test_a_full_sync_is_one_save_and_one_restore_and_keeps_each_jump_once() -> None:
    rig = Rig()
    ipt = CountingIptables()
    rig.mode.ipt = ipt
    assert rig.sync().ok
    assert (ipt.saves, len(ipt.restores), ipt.others) == (1, 1, 0)
    # Upstream inserts each jump at position 1, one after another: the last comes first.
    assert _jump_lines(ipt, "filter", "INPUT") == [
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
        '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT',
    ]
    before = {t: ipt.save(t) for t in ("nat", "filter")}
    saves = ipt.saves
    assert rig.mode.sync(rig.core.snapshot(), True).ok
    assert (ipt.saves - saves, len(ipt.restores), ipt.others) == (1, 2, 0)
    assert {t: ipt.save(t) for t in ("nat", "filter")} == before  # and it added nothing
    saves = ipt.saves
    rig.set_endpoints(0, ["10.0.0.9"])
    assert rig.sync().ok and not rig.mode.last_stats.full
    assert (ipt.saves - saves, len(ipt.restores)) == (0, 3)  # a partial sync reads no rules


def test_a_jump_removed_behind_the_proxys_back_comes_back_with_the_next_full_sync() -> None:
    rig = Rig()
    assert rig.sync().ok
    rig.ipt.restore(
        "*nat\n-D PREROUTING -m comment --comment "
        '"kubernetes service portals" -j KUBE-SERVICES\nCOMMIT\n'
    )
    assert _jump_lines(rig.ipt, "nat", "PREROUTING") == []
    assert rig.mode.sync(rig.core.snapshot(), True).ok
    assert _jump_lines(rig.ipt, "nat", "PREROUTING") == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    ]


def test_a_failed_save_fails_the_full_sync_without_a_restore() -> None:
    rig = Rig()
    ipt = CountingIptables()

    def broken_save(table: str | None = None, *, counters: bool = False) -> str:
        raise IptablesError("iptables-save failed", stderr="injected")

    ipt.save = broken_save  # type: ignore[method-assign]
    rig.mode.ipt = ipt
    result = rig.mode.sync(rig.core.snapshot(), True)
    assert not result.ok and "iptables-save failed" in result.error
    assert ipt.restores == [] and rig.mode.need_full
