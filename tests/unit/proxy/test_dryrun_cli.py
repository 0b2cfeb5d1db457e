"""Upstream's TestSyncProxyRulesRepeated through ``kproxy proxy --dry-run`` (a subprocess).

The test rewrites the ``--objects`` file step by step (atomic rename; the
objects of each step are ``fixtures/sync_repeated/stepN.yaml``) and reads the
proxy's stdout until each ``# kproxy sync <n> <full|partial>`` block is
complete, every wait bounded. Each block is compared with upstream's expected
restore input for that step (``golden_dumps.UPSTREAM_REPEATED_STEPn``) after
upstream's sortIPTablesRules normalisation.

Differences from upstream's fake applied to the *expected* side, explicitly:

- the masquerade mark: kube-proxy and kproxy write ``0x00004000`` (Go
  ``%#08x``), upstream's fake ``0x4000`` (see test_render_cli.as_upstream_fake);
- nfacct: upstream's fake has the ``ct_state_invalid_dropped_pkts`` counter;
  ``kproxy proxy --dry-run`` takes no ``--host-features`` and assumes no nfacct
  (kproxy creates no nfacct counters), so its INVALID rule has no ``-m nfacct``;
  if this host has ``nf_conntrack_tcp_be_liberal`` set, the rule is absent
  (upstream's TestDropInvalidRule "tcpLiberal" case).

Step 8 (a sync without changes): a dry-run proxy does not sync when nothing
changed (rewriting identical content is asserted to produce no sync); its
periodic full sync comes only every FULL_SYNC_PERIOD (1 h, upstream's
FullSyncPeriod). The step is driven by a Node-only change (a label), which
syncs without any Service or EndpointSlice change — upstream's step 8.

Step 9 upstream is the full resync that follows a forced partial-restore
failure; the failure and the fallback are covered by
test_iptables_mode.py::test_failed_restore_counts_and_forces_the_next_sync_full
(with the fake iptables). Here deleting svc4 is a plain partial sync, which
must equal upstream's step-9 input without the chains of the unchanged
Services (svc1, svc3).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.proxy import golden_dumps as G
from tests.unit.proxy.goldens import NODE_IP, NODE_NAME, POD_CIDR, sort_iptables_rules
from tests.unit.proxy.test_render_cli import as_upstream_fake, render, table

STEPS = Path(__file__).parent / "fixtures" / "sync_repeated"
SYNC_TIMEOUT = 20.0  # seconds for one sync block to appear (the file is polled every 0.5 s)
QUIET_PERIOD = 2.0  # seconds without output that show "no sync"
STOP_TIMEOUT = 10.0

HEADER = re.compile(r"^# kproxy sync (\d+) (full|partial)$")
SERVICE_CHAIN = re.compile(r"^:(KUBE-(?:SVC|SVL|EXT|FW|SEP)-\S+) ")

NFACCT_INVALID = (
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name "
    "ct_state_invalid_dropped_pkts -j DROP\n"
)


def host_tcp_be_liberal() -> bool:
    try:
        value = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal").read_text().strip()
    except OSError:
        return False
    return value not in ("", "0")


def dry_run_expected(upstream: str) -> str:
    """Upstream's expectation for a host without nfacct counters (see the module doc)."""
    assert NFACCT_INVALID in upstream
    plain = (
        "" if host_tcp_be_liberal() else "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
    )
    return upstream.replace(NFACCT_INVALID, plain)


def drop_chains(dump: str, chains: set[str]) -> str:
    """``dump`` without the chain lines and rules of ``chains``."""
    keep = [
        line
        for line in dump.splitlines()
        if not (line.startswith(":") and line[1:].split()[0] in chains)
        and not (line.startswith("-A ") and line.split()[1] in chains)
    ]
    return "\n".join(keep) + "\n"


class DryRunProxy:
    """``kproxy proxy --dry-run`` following an objects file; its stdout read by a thread."""

    def __init__(self, objects: Path, *flags: str) -> None:
        self.objects = objects
        argv = [
            sys.executable,
            "-m",
            "kproxy.cli",
            "proxy",
            "--proxy-mode",
            "iptables",
            "--objects",
            str(objects),
            "--dry-run",
            "--hostname-override",
            NODE_NAME,
            "--node-ip",
            NODE_IP,
            "--cluster-cidr",
            POD_CIDR,
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "",
            "--iptables-min-sync-period",
            "0",
            *flags,
        ]
        self.stderr = objects.with_suffix(".stderr")
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no sync output in time; stderr:\n{self.stderr.read_text()}"
            ) from None
        if line is None:
            raise AssertionError(
                f"the proxy exited ({self.proc.poll()}):\n{self.stderr.read_text()}"
            )
        return line

    def next_sync(self, timeout: float = SYNC_TIMEOUT) -> tuple[int, str, str]:
        """(n, kind, restore input) of the next complete sync block."""
        deadline = time.monotonic() + timeout
        header = HEADER.match(self._line(deadline).rstrip("\n"))
        assert header is not None, "output does not start with a sync header"
        body: list[str] = []
        while body.count("COMMIT\n") < 2:  # *filter … COMMIT *nat … COMMIT
            body.append(self._line(deadline))
        return int(header.group(1)), header.group(2), "".join(body)

    def quiet(self, period: float = QUIET_PERIOD) -> bool:
        """True if nothing is printed for ``period`` seconds."""
        try:
            line = self.lines.get(timeout=period)
        except queue.Empty:
            return True
        self.lines.put(line)  # not consumed; the caller fails anyway
        return False

    def write(self, source: Path) -> None:
        """Replace the objects file atomically with ``source``'s content."""
        tmp = self.objects.with_suffix(".tmp")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, self.objects)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the proxy returns normally
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.reader.join(timeout=STOP_TIMEOUT)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[DryRunProxy]:
    objects = tmp_path / "objects.yaml"
    objects.write_bytes((STEPS / "step1.yaml").read_bytes())
    p = DryRunProxy(objects)
    try:
        yield p
    finally:
        p.stop()
    assert p.proc.returncode == 0, p.stderr.read_text()


def service_chains(restore: str) -> set[str]:
    """The service chains (KUBE-SVC/SVL/EXT/FW/SEP) a restore input writes or deletes."""
    return {m.group(1) for line in table(restore, "nat") if (m := SERVICE_CHAIN.match(line))}


def deleted_chains(restore: str) -> set[str]:
    return set(re.findall(r"^-X (\S+)$", restore, re.M))


def chains_of(step: str, namespace: str, name: str) -> set[str]:
    """The service chains of one Service in a full render of a step's objects."""
    full = render(STEPS / step)
    rules = [r for r in table(full, "nat") if r.startswith("-A ")]
    owned = {
        r.split()[1]
        for r in rules
        if re.search(rf'--comment "?{namespace}/{name}[: ]', r)
        and SERVICE_CHAIN.match(f":{r.split()[1]} ")
    }
    assert owned, f"no chains for {namespace}/{name} in {step}"
    return owned


def check_step(proxy: DryRunProxy, n: int, kind: str) -> str:
    got_n, got_kind, restore = proxy.next_sync()
    assert (got_n, got_kind) == (n, kind)
    expected = dry_run_expected(G.UPSTREAM_REPEATED[n - 1])
    assert sort_iptables_rules(as_upstream_fake(restore)) == expected, f"step {n}"
    return restore


def test_sync_proxy_rules_repeated(proxy: DryRunProxy) -> None:
    # Step 1: the initial sync is full.
    check_step(proxy, 1, "full")

    # Step 2: add a Service; only its chains are written (plus the top-level ones).
    proxy.write(STEPS / "step2.yaml")
    restore = check_step(proxy, 2, "partial")
    assert service_chains(restore) == chains_of("step2.yaml", "ns3", "svc3")

    # Step 3: delete a Service; its chains are flushed and deleted (":X" and "-X X").
    proxy.write(STEPS / "step3.yaml")
    restore = check_step(proxy, 3, "partial")
    gone = {"KUBE-SVC-2VJB64SDSIJUP5T6", "KUBE-SEP-UHEGFW77JX3KXTOV"}
    assert service_chains(restore) == deleted_chains(restore) == gone

    # Step 4: a Service without endpoints: a filter REJECT, no service chain.
    proxy.write(STEPS / "step4.yaml")
    restore = check_step(proxy, 4, "partial")
    assert service_chains(restore) == set()

    # Step 5: its endpoints arrive: only svc4's chains.
    proxy.write(STEPS / "step5.yaml")
    restore = check_step(proxy, 5, "partial")
    assert service_chains(restore) == chains_of("step5.yaml", "ns4", "svc4")

    # Step 6: an endpoint changes: ONLY that Service's chains (and the old SEP deleted).
    proxy.write(STEPS / "step6.yaml")
    restore = check_step(proxy, 6, "partial")
    assert deleted_chains(restore) == {"KUBE-SEP-BSWRHOQ77KEXZLNL"}
    assert service_chains(restore) - deleted_chains(restore) == chains_of(
        "step6.yaml", "ns3", "svc3"
    )

    # Step 7: an endpoint is added to the same Service: again only its chains.
    proxy.write(STEPS / "step7.yaml")
    restore = check_step(proxy, 7, "partial")
    assert service_chains(restore) == chains_of("step7.yaml", "ns3", "svc3")
    assert not deleted_chains(restore)

    # Identical content: no change, so no sync (upstream's periodic one is hourly).
    proxy.write(STEPS / "step7.yaml")
    assert proxy.quiet(), "a sync without any change"

    # Step 8: a sync with no Service/EndpointSlice change (driven by a Node label).
    proxy.write(STEPS / "step8.yaml")
    restore = check_step(proxy, 8, "partial")
    assert service_chains(restore) == set()

    # Step 9: delete svc4. Upstream's step 9 is a full resync (after a forced
    # failure, see the module doc); the partial sync is that minus svc1/svc3's chains.
    proxy.write(STEPS / "step9.yaml")
    n, kind, restore = proxy.next_sync()
    assert (n, kind) == (9, "partial")
    unchanged = chains_of("step9.yaml", "ns1", "svc1") | chains_of("step9.yaml", "ns3", "svc3")
    expected = drop_chains(dry_run_expected(G.UPSTREAM_REPEATED_STEP9), unchanged)
    assert sort_iptables_rules(as_upstream_fake(restore)) == expected
    assert (
        service_chains(restore)
        == deleted_chains(restore)
        == {
            "KUBE-SVC-4SW47YFZTEDKD3PK",
            "KUBE-SEP-AYCN5HPXMIRJNJXU",
        }
    )
    assert proxy.quiet(0.5)


def test_large_cluster_mode_partial_syncs(tmp_path: Path) -> None:
    """Upstream TestSyncProxyRulesLargeClusterMode's partial syncs.

    Crossing largeClusterEndpointsThreshold does not force a full sync, so only
    the changed Service's endpoints are written, without comments; a deleted
    Service's chains are not deleted until a sync period has passed since the
    last stale-chain cleanup (upstream sets lastIPTablesCleanup = now; here the
    sync period is 10 min, so within the test the cleanup is never due).
    The later full resync that drops every comment is test_render_cli's
    test_large_cluster_mode (a full render of the same objects).
    """
    from tests.unit.proxy.test_render_cli import (
        count_endpoints_and_comments,
        large_cluster_objects,
        write_objects,
    )

    objects = write_objects(
        tmp_path / "objects.yaml", large_cluster_objects(svc3_endpoints=False, svc4=False)
    )
    staged = tmp_path / "staged.yaml"
    p = DryRunProxy(objects, "--masquerade-all", "--iptables-sync-period", "10m")
    try:
        n, kind, restore = p.next_sync()
        assert (n, kind) == (1, "full")
        first, count, comments = count_endpoints_and_comments(restore, "10.0.0.0")
        assert first == G.UPSTREAM_LARGE_CLUSTER_FIRST_EP_COMMENTED
        assert count == comments == 998

        p.write(write_objects(staged, large_cluster_objects(svc3_endpoints=True, svc4=False)))
        n, kind, restore = p.next_sync()
        assert (n, kind) == (2, "partial")
        svc3, count, comments = count_endpoints_and_comments(restore, "203.0.113.4")
        assert svc3 == G.UPSTREAM_LARGE_CLUSTER_SVC3_EP
        assert (count, comments) == (3, 0)

        with_svc4 = large_cluster_objects(svc3_endpoints=True, svc4=True)
        p.write(write_objects(staged, with_svc4))
        n, kind, restore = p.next_sync()
        assert (n, kind) == (3, "partial")
        svc4, count, _ = count_endpoints_and_comments(restore, "10.4.0.1")
        assert svc4 == G.UPSTREAM_LARGE_CLUSTER_SVC4_EP and count == 1

        # Delete the Service svc4 (its EndpointSlice stays, as upstream).
        without = [
            d for d in with_svc4 if not (d["kind"] == "Service" and d["metadata"]["name"] == "svc4")
        ]
        p.write(write_objects(staged, without))
        n, kind, restore = p.next_sync()
        assert (n, kind) == (4, "partial")
        svc4, count, _ = count_endpoints_and_comments(restore, "10.4.0.1")
        assert (svc4, count) == ("", 0)
        assert "-X " not in restore, "stale chains deleted before a sync period passed"
    finally:
        p.stop()
    assert p.proc.returncode == 0, p.stderr.read_text()
