"""The iptables applier and the proxy loop against the stateful FakeIptables."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.core import ProxyCore
from kproxy.proxy.daemon import run_proxy
from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.iptables.chains import JUMP_CHAINS, KUBE_PROXY_CANARY, ServiceChains
from kproxy.proxy.iptables.mode import DryRunIptablesMode, IptablesMode
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.mode import Mode
from kproxy.proxy.proxier import Proxier, SyncFailed
from kproxy.proxy.types import ServicePortName
from tests.unit.proxy.goldens import NODE_NAME, make_service, make_slice, test_options

FAMILY = "IPv4"


def chains_of(ns: str, name: str) -> ServiceChains:
    return ServiceChains.of(ServicePortName(ns, name, "p80", "TCP"))


class Rig:
    """A core with two Services, a fake kernel, the mode and the loop."""

    def __init__(self, *, clock: list[float] | None = None) -> None:
        self.now = clock if clock is not None else [1000.0]
        self.ipt = FakeIptables()
        self.metrics = ProxyMetrics()
        self.health = ProxyHealth(60.0)
        self.core = ProxyCore(NODE_NAME)
        options = test_options(nfacct_ct_state_invalid=False, nfacct_localhost_nodeports=False)
        self.mode = IptablesMode(self.ipt, options, self.metrics, clock=lambda: self.now[0])
        self.proxier = Proxier(
            self.core,
            self.mode,
            health=self.health,
            metrics=self.metrics,
            canary=self.mode.canary_present,
            on_topology=self.mode.set_topology_labels,
            clock=lambda: self.now[0],
        )
        self.slices: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(("svc1", "svc2"), start=1):
            self.core.on_service(None, make_service("ns1", name, f"172.30.0.4{i}"))
            self.set_endpoints(name, [f"10.0.{i}.1"])
        self.core.synced()

    def set_endpoints(self, service: str, ips: list[str]) -> None:
        new = make_slice("ns1", service, 1, [{"addresses": [ip]} for ip in ips])
        self.core.on_endpoint_slice(self.slices.get(service), new)
        self.slices[service] = new

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def test_mode_satisfies_the_protocol() -> None:
    rig = Rig()
    assert isinstance(rig.mode, Mode)
    assert isinstance(DryRunIptablesMode(io.StringIO(), test_options()), Mode)


def test_first_sync_is_full_and_installs_jump_rules() -> None:
    rig = Rig()
    result = rig.proxier.sync_now()
    assert result is not None and result.ok and result.full
    for jump in JUMP_CHAINS:
        assert rig.ipt._has_rule(jump.table, jump.source, jump.rule_args()), jump
    for table in ("mangle", "nat", "filter"):
        assert rig.ipt.chain_exists(table, KUBE_PROXY_CANARY)
    nat = rig.ipt.save("nat")
    for svc in ("svc1", "svc2"):
        assert f":{chains_of('ns1', svc).svc} " in nat
    assert rig.health.status()[0]
    assert rig.sample("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ip_family=FAMILY)
    assert (
        rig.sample("kubeproxy_sync_proxy_rules_iptables_total", table="nat", ip_family=FAMILY)
        == result.rules_total["nat"]
    )
    assert rig.sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
    assert rig.sample("kubeproxy_sync_proxy_rules_service_changes_total") == 2


def test_partial_sync_writes_only_the_changed_service() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    restores = len(rig.ipt.restores)
    rig.set_endpoints("svc1", ["10.0.1.1", "10.0.1.2"])
    result = rig.proxier.sync_now()
    assert result is not None and result.ok and not result.full
    # One restore, and no jump-rule commands (those go through ensure_rule, not restore).
    assert len(rig.ipt.restores) == restores + 1
    text = rig.ipt.restores[-1]
    nat = text.split("*nat\n", 1)[1]
    c1, c2 = chains_of("ns1", "svc1"), chains_of("ns1", "svc2")
    assert f":{c1.svc} - [0:0]" in nat
    assert c1.endpoint_chain("10.0.1.2:80") in nat
    assert f":{c2.svc} " not in nat and c2.endpoint_chain("10.0.2.1:80") not in nat
    assert ":KUBE-SERVICES - [0:0]" in nat and ":KUBE-SERVICES - [0:0]" in text.split("*nat")[0]
    # svc2's rules are still in the kernel, and KUBE-SERVICES still jumps to them.
    saved = rig.ipt.save("nat")
    assert f"-j {c2.svc}" in saved and f":{c2.svc} " in saved
    assert rig.sample("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ip_family=FAMILY)


def test_failed_restore_counts_and_forces_the_next_sync_full() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    rig.set_endpoints("svc1", ["10.0.1.3"])
    rig.ipt.fail_restores = 1
    with pytest.raises(SyncFailed, match="injected"):
        rig.proxier.sync_now()
    assert (
        rig.sample("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family=FAMILY)
        == 1
    )
    assert (
        rig.sample(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ip_family=FAMILY
        )
        == 1
    )
    result = rig.proxier.sync_now()
    assert result is not None and result.ok and result.full
    # The failed partial sync's change is in the kernel after the full one.
    assert chains_of("ns1", "svc1").endpoint_chain("10.0.1.3:80") in rig.ipt.save("nat")


def test_failed_full_restore_is_not_a_partial_failure() -> None:
    rig = Rig()
    rig.ipt.fail_restores = 1
    with pytest.raises(SyncFailed):
        rig.proxier.sync_now()
    assert (
        rig.sample("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ip_family=FAMILY)
        == 1
    )
    assert not rig.sample(
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ip_family=FAMILY
    )
    # The mode itself also remembers: a partial request after its failure is promoted.
    assert rig.mode.need_full


def test_full_sync_after_an_hour_and_on_topology_change() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    rig.core.on_node(None, {"metadata": {"name": NODE_NAME}})
    result = rig.proxier.sync_now()
    assert result is not None and not result.full
    rig.core.on_node(
        {"metadata": {"name": NODE_NAME}},
        {"metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "z1"}}},
    )
    result = rig.proxier.sync_now()
    assert result is not None and result.full
    assert rig.mode.renderer.options.topology_labels == (("topology.kubernetes.io/zone", "z1"),)
    rig.now[0] += 3599
    result = rig.proxier.sync_now()
    assert result is not None and not result.full
    rig.now[0] += 2
    result = rig.proxier.sync_now()
    assert result is not None and result.full


def test_deleted_canary_forces_a_full_resync() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    assert rig.proxier.check_canary()
    rig.ipt.delete_chain("mangle", KUBE_PROXY_CANARY)
    assert not rig.proxier.check_canary()
    result = rig.proxier.sync_now()
    assert result is not None and result.full
    assert rig.mode.canary_present()


def test_the_loop_resyncs_when_rules_are_flushed() -> None:
    async def scenario() -> None:
        rig = Rig()
        rig.proxier.sync_period = 0.02
        tasks = [
            asyncio.create_task(rig.proxier.runner.loop()),
            asyncio.create_task(rig.proxier.canary_loop()),
        ]
        try:
            rig.proxier.runner.run()
            for _ in range(200):
                if rig.proxier.syncs:
                    break
                await asyncio.sleep(0.01)
            assert [r.full for r in rig.proxier.syncs] == [True]
            # Someone flushes nat behind our back, canary included.
            for chain in ("KUBE-SERVICES", KUBE_PROXY_CANARY):
                rig.ipt.flush_chain("nat", chain)
            rig.ipt.delete_rule("nat", "OUTPUT", JUMP_CHAINS[-3].rule_args())
            rig.ipt.delete_chain("nat", KUBE_PROXY_CANARY)
            for _ in range(300):
                if len(rig.proxier.syncs) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert [r.full for r in rig.proxier.syncs][:2] == [True, True]
            assert rig.mode.canary_present()
            assert "-A OUTPUT" in rig.ipt.save("nat")
        finally:
            rig.proxier.runner.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_cleanup_leaves_no_kube_chain_and_is_idempotent() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    rig.mode.cleanup()
    saved = rig.ipt.save()
    assert "KUBE-" not in saved, saved
    rig.mode.cleanup()
    assert "KUBE-" not in rig.ipt.save()
    # And the mode reinstalls everything on its next sync.
    result = rig.mode.sync(rig.core.snapshot(), full=False)
    assert result.ok and result.full and rig.mode.canary_present()


def test_stale_chains_are_deleted_after_a_service_goes() -> None:
    rig = Rig()
    rig.proxier.sync_now()
    svc2 = make_service("ns1", "svc2", "172.30.0.42")
    rig.core.on_service(svc2, None)
    rig.core.on_endpoint_slice(rig.slices.pop("svc2"), None)
    result = rig.proxier.sync_now()
    assert result is not None and result.ok and result.deleted_chains >= 2
    assert chains_of("ns1", "svc2").svc not in rig.ipt.save("nat")


def test_dry_run_writes_one_header_per_sync() -> None:
    out = io.StringIO()
    core = ProxyCore(NODE_NAME)
    mode = DryRunIptablesMode(out, test_options())
    proxier = Proxier(core, mode, health=ProxyHealth(60), metrics=ProxyMetrics())
    slices: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(("svc1", "svc2"), start=1):
        core.on_service(None, make_service("ns1", name, f"172.30.0.4{i}"))
        slices[name] = make_slice("ns1", name, 1, [{"addresses": [f"10.0.{i}.1"]}])
        core.on_endpoint_slice(None, slices[name])
    assert proxier.sync_now() is None  # not synced yet: nothing written
    core.synced()
    proxier.sync_now()
    core.on_endpoint_slice(
        slices["svc1"], make_slice("ns1", "svc1", 1, [{"addresses": ["10.0.1.9"]}])
    )
    proxier.sync_now()
    core.on_service(make_service("ns1", "svc2", "172.30.0.42"), None)
    proxier.sync_now()
    text = out.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("# kproxy sync")]
    assert headers == ["# kproxy sync 1 full", "# kproxy sync 2 partial", "# kproxy sync 3 partial"]
    assert all(text.count(h + "\n") == 1 for h in headers)
    third = text.split("# kproxy sync 3 partial\n")[1]
    c2 = chains_of("ns1", "svc2")
    assert f"-X {c2.svc}" in third and f"-X {c2.endpoint_chain('10.0.2.1:80')}" in third
    # The endpoint chain replaced in sync 2 was deleted then, not again in sync 3.
    old = chains_of("ns1", "svc1").endpoint_chain("10.0.1.1:80")
    assert f"-X {old}" in text.split("# kproxy sync 3")[0] and f"-X {old}" not in third


def test_run_proxy_dry_run(tmp_path: Path) -> None:
    objects = tmp_path / "objects.json"
    svc = make_service("ns1", "svc1", "172.30.0.41")
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.0.1.1"]}])
    docs = [{"kind": "Service", **svc}, {"kind": "EndpointSlice", **es}]
    objects.write_text(json.dumps({"kind": "List", "items": docs}))
    cfg = ProxyConfig(
        hostname_override=NODE_NAME,
        objects=str(objects),
        healthz_bind_address="",
        metrics_bind_address="",
        min_sync_period=0.0,
    )
    out = io.StringIO()

    async def scenario() -> None:
        task = asyncio.create_task(run_proxy(cfg, dry_run=True, out=out))
        try:
            for _ in range(300):
                if "# kproxy sync 1 full" in out.getvalue() or task.done():
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(scenario(), 10))
    text = out.getvalue()
    assert text.startswith("# kproxy sync 1 full\n*filter\n"), text[:200]
    assert chains_of("ns1", "svc1").svc in text


def test_run_proxy_returns_on_sigterm(tmp_path: Path) -> None:
    objects = tmp_path / "objects.yaml"
    objects.write_text("")
    cfg = ProxyConfig(
        hostname_override=NODE_NAME,
        objects=str(objects),
        healthz_bind_address="",
        metrics_bind_address="",
        min_sync_period=0.0,
    )
    out = io.StringIO()
    before = signal.getsignal(signal.SIGTERM)

    async def scenario() -> None:
        task = asyncio.create_task(run_proxy(cfg, dry_run=True, out=out))
        try:
            for _ in range(300):
                if out.getvalue() or task.done():
                    break
                await asyncio.sleep(0.01)
            # Only signal ourselves when run_proxy's handler is the one installed.
            assert signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 5)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert signal.getsignal(signal.SIGTERM) is before
    assert out.getvalue().startswith("# kproxy sync 1 full\n")


def test_after_sync_hook_runs_only_after_success_and_never_fails_the_sync() -> None:
    rig = Rig()
    seen: list[bool] = []

    def hook(snap: Any) -> None:
        seen.append(bool(snap.changed))
        raise RuntimeError("conntrack trouble")

    rig.proxier._after_sync = hook
    rig.ipt.fail_restores = 1
    with pytest.raises(SyncFailed):
        rig.proxier.sync_now()
    assert seen == []
    result = rig.proxier.sync_now()
    assert result is not None and result.ok and seen == [False]
