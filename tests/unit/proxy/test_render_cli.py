"""Upstream's iptables goldens run through ``kproxy render iptables`` (a subprocess).

Inputs are YAML objects files under ``fixtures/`` (Services, EndpointSlices and
the Node of upstream's ``NewFakeProxier``: name ``test-node``, node IP
192.168.0.2); the fake's pod CIDR 10.0.0.0/8 is ``--cluster-cidr`` and its
nfacct counters are ``--host-features nfacct`` (the fake has no
``--random-fully``: its goldens end ``-j MASQUERADE``).

Expectations come from upstream ``pkg/proxy/iptables/proxier_test.go``
@531be81 (``golden_dumps.UPSTREAM_*``): whole dumps where upstream has them
(TestOverallIPTablesRules, TestBadIPs, TestSyncProxyRulesRepeated's full syncs),
the exact lines and counts of TestSyncProxyRulesLargeClusterMode,
TestMasqueradeRule and TestDropInvalidRule, and upstream's packet-flow tables
(TestLoadBalancer, TestNoEndpointsReject, TestExternalTrafficPolicyLocal,
TestInternalTrafficPolicy, TestInternalExternalMasquerade) evaluated on the CLI
output by a port of upstream's ``tracePacket``.

ONE normalisation, applied explicitly by :func:`as_upstream_fake`: real
kube-proxy (and kproxy) write the masquerade mark with Go's ``%#08x``,
``0x00004000``; upstream's unit-test fake sets the string ``0x4000``.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.proxy import golden_dumps as G
from tests.unit.proxy.goldens import NODE_IP, NODE_NAME, POD_CIDR, sort_iptables_rules

FIXTURES = Path(__file__).parent / "fixtures"
CLI_TIMEOUT = 60.0  # seconds; a render of 1000 endpoints takes well under one

REAL_MARK = "0x00004000"  # fmt.Sprintf("%#08x", 1<<14), what kube-proxy writes
FAKE_MARK = "0x4000"  # NewFakeProxier's masqueradeMark

# Upstream's conventions for tests using NewFakeProxier.
TEST_NODE_IPS = ("192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2")
EXTERNAL_CLIENT = "203.0.113.2"
EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
POD = "10.0.0.2"


def render(objects: Path, *flags: str, fake: bool = True) -> str:
    """``kproxy render iptables`` with NewFakeProxier's settings (``fake``) plus ``flags``."""
    base = ["--hostname-override", NODE_NAME, "--node-ip", NODE_IP]
    if fake:
        base += ["--cluster-cidr", POD_CIDR, "--host-features", "nfacct"]
    argv = [sys.executable, "-m", "kproxy.cli", "render", "iptables", "--objects", str(objects)]
    proc = subprocess.run(
        [*argv, *base, *flags], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def as_upstream_fake(text: str) -> str:
    """The documented normalisation: kube-proxy's mark string → the fake's."""
    assert FAKE_MARK + "/" not in text and "--or-mark 0x4000\n" not in text, "mark already short"
    return text.replace(REAL_MARK, FAKE_MARK)


def table(text: str, name: str) -> list[str]:
    """The lines of one table of a restore input (without ``*name`` and COMMIT)."""
    lines = text.split(f"*{name}\n", 1)[1].split("COMMIT\n", 1)[0]
    return lines.splitlines()


def chain(text: str, table_name: str, chain_name: str) -> str:
    """The rules of one chain, in order, as upstream's ``assertIPTablesChainEqual`` sees them."""
    prefix = f"-A {chain_name} "
    return "".join(f"{r}\n" for r in table(text, table_name) if r.startswith(prefix))


def without_deleted_chains(dump: str) -> str:
    """``dump`` minus the ``:X``/``-X X`` lines of the chains it deletes.

    A ``kproxy render`` knows no existing chains, so it never deletes any; the
    rest of a full sync's restore input is what the render must print.
    """
    deleted = set(re.findall(r"^-X (\S+)$", dump, re.M))
    keep = [
        line
        for line in dump.splitlines()
        if not line.startswith("-X ")
        and not (line.startswith(":") and line[1:].split()[0] in deleted)
    ]
    return "\n".join(keep) + "\n"


# -- TestOverallIPTablesRules and the masquerade mark -----------------------------


def test_overall_rules_match_upstream_golden() -> None:
    out = render(FIXTURES / "overall.yaml")
    assert f"-A KUBE-MARK-MASQ -j MARK --or-mark {REAL_MARK}" in out.splitlines()
    assert sort_iptables_rules(as_upstream_fake(out)) == G.UPSTREAM_OVERALL_SORTED
    # kproxy's own emission order (checked against proxier.go) is stable too.
    assert as_upstream_fake(out) == G.OVERALL


def test_masquerade_bit_14_prints_kube_proxy_mark() -> None:
    default = render(FIXTURES / "overall.yaml")
    out = render(FIXTURES / "overall.yaml", "--iptables-masquerade-bit", "14")
    assert out == default
    lines = out.splitlines()
    assert f"-A KUBE-MARK-MASQ -j MARK --or-mark {REAL_MARK}" in lines
    assert f"-A KUBE-POSTROUTING -m mark ! --mark {REAL_MARK}/{REAL_MARK} -j RETURN" in lines
    assert f"-A KUBE-POSTROUTING -j MARK --xor-mark {REAL_MARK}" in lines
    assert not re.search(r"mark 0x4000\b", out)
    bit0 = render(FIXTURES / "overall.yaml", "--iptables-masquerade-bit", "0")
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00000001" in bit0.splitlines()


# -- TestBadIPs ----------------------------------------------------------------------


def test_bad_ips_rewritten_like_upstream() -> None:
    out = render(FIXTURES / "bad_ips.yaml")
    assert sort_iptables_rules(as_upstream_fake(out)) == G.UPSTREAM_BAD_IPS_SORTED


# -- TestSyncProxyRulesRepeated: its two full syncs ----------------------------------


def test_repeated_initial_full_sync() -> None:
    out = render(FIXTURES / "sync_repeated" / "step1.yaml")
    assert sort_iptables_rules(as_upstream_fake(out)) == G.UPSTREAM_REPEATED_STEP1


def test_repeated_final_full_resync() -> None:
    # Step 9 is the full resync after the forced partial failure (the failure is
    # covered by test_iptables_mode.py::test_failed_restore_counts_and_forces_the_next_sync_full).
    out = render(FIXTURES / "sync_repeated" / "step9.yaml")
    expected = without_deleted_chains(G.UPSTREAM_REPEATED_STEP9)
    assert "KUBE-SEP-AYCN5HPXMIRJNJXU" not in expected
    assert sort_iptables_rules(as_upstream_fake(out)) == expected


# -- TestMasqueradeRule / TestDropInvalidRule (single chains) -------------------------


@pytest.fixture(scope="module")
def no_services(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("objects") / "node-only.yaml"
    path.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}})
    )
    return path


@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(no_services: Path, random_fully: bool) -> None:
    features = "random-fully,nfacct" if random_fully else "nfacct"
    out = render(no_services, "--cluster-cidr", POD_CIDR, "--host-features", features, fake=False)
    suffix = " --random-fully" if random_fully else ""
    assert (
        chain(as_upstream_fake(out), "nat", "KUBE-POSTROUTING") == G.UPSTREAM_POSTROUTING % suffix
    )


@pytest.mark.parametrize("features", ["", "nfacct", "tcp-be-liberal"])
def test_drop_invalid_rule(no_services: Path, features: str) -> None:
    out = render(no_services, "--cluster-cidr", POD_CIDR, "--host-features", features, fake=False)
    expected = G.UPSTREAM_FORWARD_DROP_RULES[features] + G.UPSTREAM_FORWARD_TAIL
    assert chain(as_upstream_fake(out), "filter", "KUBE-FORWARD") == expected


# -- probabilities ---------------------------------------------------------------------


def test_probabilities_and_endpoint_order() -> None:
    out = render(FIXTURES / "probabilities.yaml")
    svc = [r for r in table(out, "nat") if r.startswith("-A KUBE-SVC-") and " -> " in r]
    order = [r.split(" -> ")[1].split('"')[0] for r in svc]
    # byEndpoint sorts the strings "IP:port": ":" (0x3a) sorts after "0", so .10 comes first.
    assert order == [f"10.180.0.{i}:80" for i in (10, 1, 2, 3, 4, 5, 6, 7, 8, 9)]
    probs = [r.split("--probability ")[1].split()[0] if "--probability" in r else None for r in svc]
    # computeProbability(n) = fmt.Sprintf("%0.10f", 1.0/float64(n)); TestComputeProbability
    # pins 10 -> 0.1000000000 and 2 -> 0.5000000000; the last endpoint has no statistic match.
    assert probs == [
        "0.1000000000",
        "0.1111111111",
        "0.1250000000",
        "0.1428571429",
        "0.1666666667",
        "0.2000000000",
        "0.2500000000",
        "0.3333333333",
        "0.5000000000",
        None,
    ]
    assert all("-m statistic --mode random --probability" in r for r in svc[:-1])


# -- TestSyncProxyRulesLargeClusterMode ------------------------------------------------


def _svc(ns: str, name: str, ip: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "ports": [{"name": f"p{port}", "port": port, "protocol": "TCP"}],
        },
    }


def _slice(ns: str, name: str, port: int, ips: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": ns,
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": f"p{port}", "port": port, "protocol": "TCP"}],
    }


def large_cluster_objects(*, svc3_endpoints: bool, svc4: bool) -> list[dict[str, Any]]:
    """TestSyncProxyRulesLargeClusterMode's objects (generated: 1000 endpoints are
    too many for a readable fixture). largeClusterEndpointsThreshold/2-1 = 499."""
    docs = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}},
        _svc("ns1", "svc1", "172.30.0.41", 80),
        _svc("ns2", "svc2", "172.30.0.42", 8080),
        _svc("ns3", "svc3", "172.30.0.43", 8081),
        _slice("ns1", "svc1", 80, [f"10.0.{i % 256}.{i // 256}" for i in range(499)]),
        _slice("ns2", "svc2", 8080, [f"10.1.{i % 256}.{i // 256}" for i in range(499)]),
    ]
    if svc3_endpoints:
        docs.append(_slice("ns3", "svc3", 8081, ["203.0.113.4", "203.0.113.8", "203.0.113.12"]))
    if svc4:
        docs += [
            _svc("ns4", "svc4", "172.30.0.44", 8082),
            _slice("ns4", "svc4", 8082, ["10.4.0.1"]),
        ]
    return docs


def write_objects(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def count_endpoints_and_comments(text: str, match: str) -> tuple[str, int, int]:
    """Upstream's countEndpointsAndComments."""
    matched, endpoints, comments = "", 0, 0
    for line in text.split("\n"):
        if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line:
            endpoints += 1
            if "--comment" in line:
                comments += 1
            if match in line:
                matched = line
    return matched, endpoints, comments


def test_large_cluster_mode(tmp_path: Path) -> None:
    objects = tmp_path / "objects.yaml"
    write_objects(objects, large_cluster_objects(svc3_endpoints=False, svc4=False))
    out = render(objects, "--masquerade-all")
    first, n, comments = count_endpoints_and_comments(out, "10.0.0.0")
    assert first == G.UPSTREAM_LARGE_CLUSTER_FIRST_EP_COMMENTED
    assert n == comments == 998  # below the threshold: comments kept

    write_objects(objects, large_cluster_objects(svc3_endpoints=True, svc4=False))
    out = render(objects, "--masquerade-all")
    first, n, comments = count_endpoints_and_comments(out, "10.0.0.0")
    assert first == G.UPSTREAM_LARGE_CLUSTER_FIRST_EP
    assert (n, comments) == (1001, 0)
    svc3, _, _ = count_endpoints_and_comments(out, "203.0.113.4")
    assert svc3 == G.UPSTREAM_LARGE_CLUSTER_SVC3_EP
    # The SVC→SEP jumps lose their comments too; the masquerade rule keeps its own.
    svc_rules = [r for r in table(out, "nat") if r.startswith("-A KUBE-SVC-")]
    assert all("--comment" not in r for r in svc_rules if "KUBE-MARK-MASQ" not in r)
    assert any(
        '"ns1/svc1:p80 cluster IP"' in r and r.endswith("-j KUBE-MARK-MASQ") for r in svc_rules
    )

    write_objects(objects, large_cluster_objects(svc3_endpoints=True, svc4=True))
    out = render(objects, "--masquerade-all")
    svc4, n, _ = count_endpoints_and_comments(out, "10.4.0.1")
    assert svc4 == G.UPSTREAM_LARGE_CLUSTER_SVC4_EP and n == 1002
    for deletion in G.UPSTREAM_LARGE_CLUSTER_SVC4_DELETIONS:
        assert f":{deletion.split()[1]} - [0:0]" in out.splitlines()


# -- upstream's packet tracer ----------------------------------------------------------


@dataclass
class Match:
    value: str
    negated: bool

    def matches(self, other: str) -> bool:
        return (self.value == other) != self.negated


@dataclass
class Rule:
    """The parts of a rule upstream's tracer looks at (iptablestest.Rule)."""

    raw: str
    chain: str
    args: dict[str, Match] = field(default_factory=dict)
    stateful: bool = False  # -m recent --rcheck, -m mark, --ctstate: never match

    @classmethod
    def parse(cls, line: str) -> Rule:
        tokens = shlex.split(line)
        rule = cls(line, tokens[1])
        i, negate = 2, False
        while i < len(tokens):
            tok = tokens[i]
            if tok == "!":
                negate = True
                i += 1
                continue
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("-")
            has_value = has_value and tokens[i + 1] != "!"
            value = tokens[i + 1] if has_value else ""
            if tok in ("--rcheck", "--mark", "--ctstate"):
                rule.stateful = True
            elif tok != "-m":
                rule.args[tok] = Match(value, negate)
            negate = False
            i += 2 if has_value else 1
        return rule

    def get(self, opt: str) -> Match | None:
        return self.args.get(opt)


def _address_matches(m: Match, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if "/" in m.value:
        matches = addr in ipaddress.ip_network(m.value, strict=False)
    else:
        matches = addr == ipaddress.ip_address(m.value)
    return matches != m.negated


class Tracer:
    """Port of upstream's iptablesTracer / tracePacket (proxier_test.go)."""

    def __init__(self, text: str, node_ips: tuple[str, ...] = TEST_NODE_IPS) -> None:
        self.chains: dict[tuple[str, str], list[Rule]] = {}
        for name in ("filter", "nat"):
            for line in table(text, name):
                if line.startswith("-A "):
                    r = Rule.parse(line)
                    self.chains.setdefault((name, r.chain), []).append(r)
        self.local = {"127.0.0.1", "::1", *node_ips}

    def _rule_matches(self, r: Rule, src: str, proto: str, dst: str, dport: str) -> bool:
        checks: list[tuple[str, str]] = [("-s", src), ("-d", dst)]
        if any((m := r.get(o)) is not None and not _address_matches(m, ip) for o, ip in checks):
            return False
        for opt, ip in (("--src-type", src), ("--dst-type", dst)):
            m = r.get(opt)
            if m is not None and not m.matches("LOCAL" if ip in self.local else "not-matched"):
                return False
        for opt, value in (("-p", proto), ("--dport", dport)):
            m = r.get(opt)
            if m is not None and not m.matches(value):
                return False
        return not r.stateful

    def run_chain(self, table_name: str, chain_name: str, pkt: tuple[str, str, str, str]) -> bool:
        for r in self.chains.get((table_name, chain_name), []):
            jump = r.get("-j")
            if jump is None or not self._rule_matches(r, *pkt):
                continue
            self.matches.append(r.raw)
            target = jump.value
            if target == "KUBE-MARK-MASQ":
                self.masq = True
                continue
            if target in ("ACCEPT", "REJECT", "DROP"):
                self.outputs.append(target)
                return True
            if target == "DNAT":
                dnat = r.get("--to-destination")
                assert dnat is not None
                self.outputs.append(dnat.value)
                return True
            if self.run_chain(table_name, target, pkt) and r.get("--probability") is None:
                return True
        return False

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> tuple[str, bool]:
        self.matches: list[str] = []
        self.outputs: list[str] = []
        self.masq = False
        # nat PREROUTING only jumps to KUBE-SERVICES (the jump rules are not in a render).
        self.run_chain("nat", "KUBE-SERVICES", (src, proto, dst, str(dport)))
        if self.outputs:
            dst = self.outputs[0].rsplit(":", 1)[0]
        for name in (
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ):
            self.run_chain("filter", name, (src, proto, dst, str(dport)))
        return ", ".join(self.outputs), self.masq


Flow = tuple[str, str, str, int, str, bool]  # name, source, destination, port, output, masq


def run_flows(text: str, flows: list[Flow]) -> None:
    tracer = Tracer(text)
    failures = []
    for name, src, dst, port, output, masq in flows:
        got = tracer.trace(src, dst, port)
        if got != (output, masq):
            failures.append(f"{name}: expected {(output, masq)}, got {got} via {tracer.matches}")
    assert not failures, "\n".join(failures)


def test_tracer_on_upstream_overall_golden() -> None:
    # TestTracePacket's cases, against upstream's own TestOverallIPTablesRules dump.
    run_flows(
        G.UPSTREAM_OVERALL_SORTED,
        [
            ("no match", POD, "10.0.0.3", 80, "", False),
            ("single endpoint", POD, "172.30.0.41", 80, "10.180.0.1:80", False),
            ("multiple endpoints", POD, "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
            ("LOCAL, KUBE-MARK-MASQ", NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
            ("DROP", EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
            ("ACCEPT (NodePortHealthCheck)", NODE_IP, NODE_IP, 30000, "ACCEPT", False),
            ("REJECT", POD, "172.30.0.46", 80, "REJECT", False),
        ],
    )


def test_load_balancer_source_ranges_flows() -> None:
    ep = "10.180.0.1:80"
    out = render(FIXTURES / "load_balancer.yaml")
    run_flows(
        out,
        [
            ("pod to cluster IP", POD, "172.30.0.41", 80, ep, False),
            ("external to nodePort", EXTERNAL_CLIENT, NODE_IP, 3001, ep, True),
            ("nodePort bypasses LBSourceRanges", EXTERNAL_CLIENT_BLOCKED, NODE_IP, 3001, ep, True),
            ("accepted external to LB1", EXTERNAL_CLIENT, "1.2.3.4", 80, ep, True),
            ("accepted external to LB2", EXTERNAL_CLIENT, "5.6.7.8", 80, ep, True),
            ("blocked external to LB1", EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
            ("blocked external to LB2", EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP", False),
            ("pod to LB1 (blocked)", POD, "1.2.3.4", 80, "DROP", False),
            ("pod to LB2 (blocked)", POD, "5.6.7.8", 80, "DROP", False),
            ("node to LB1 (allowed)", NODE_IP, "1.2.3.4", 80, ep, True),
            ("node to LB2 (allowed)", NODE_IP, "5.6.7.8", 80, ep, True),
            ("same node to LB1, SNATted to LB1", "1.2.3.4", "1.2.3.4", 80, ep, True),
            ("same node to LB2, SNATted to LB2", "5.6.7.8", "5.6.7.8", 80, ep, True),
        ],
    )
    fw = "-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment"
    assert chain(out, "nat", "KUBE-FW-XPGD46QRK7WJZT7O") == (
        f'{fw} "ns1/svc1:p80 loadbalancer IP" -s 192.168.0.0/24 -j KUBE-EXT-XPGD46QRK7WJZT7O\n'
        f'{fw} "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O\n'
        f'{fw} "ns1/svc1:p80 loadbalancer IP" -s 1.2.3.4 -j KUBE-EXT-XPGD46QRK7WJZT7O\n'
        f'{fw} "ns1/svc1:p80 loadbalancer IP" -s 5.6.7.8 -j KUBE-EXT-XPGD46QRK7WJZT7O\n'
        f'{fw} "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"\n'
    )


def test_no_endpoints_reject_flows() -> None:
    out = render(FIXTURES / "no_endpoints_reject.yaml")
    run_flows(
        out,
        [
            ("pod to cluster IP", POD, "172.30.0.41", 80, "REJECT", False),
            ("external to external IP", EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
            ("pod to NodePort", POD, NODE_IP, 3001, "REJECT", False),
            ("external to NodePort", EXTERNAL_CLIENT, NODE_IP, 3001, "REJECT", False),
            ("pod to LoadBalancer IP", POD, "1.2.3.4", 80, "REJECT", False),
            ("external to LoadBalancer IP", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
        ],
    )


def test_external_traffic_policy_local_flows() -> None:
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    out = render(FIXTURES / "etp_local.yaml")
    run_flows(
        out,
        [
            ("pod to cluster IP", POD, "172.30.0.41", 80, both, False),
            ("pod to external IP", POD, "192.168.99.11", 80, both, False),
            ("external to external IP", EXTERNAL_CLIENT, "192.168.99.11", 80, local, False),
            ("pod to LB IP", POD, "1.2.3.4", 80, both, False),
            ("external to LB IP", EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
            ("pod to NodePort", POD, NODE_IP, 3001, both, False),
            ("external to NodePort", EXTERNAL_CLIENT, NODE_IP, 3001, local, False),
            ("health check node port", EXTERNAL_CLIENT, NODE_IP, 30000, "ACCEPT", False),
        ],
    )
    assert ":KUBE-SVL-XPGD46QRK7WJZT7O - [0:0]" in table(out, "nat")


@pytest.mark.parametrize(
    ("fixture", "output"),
    [
        ("itp_cluster.yaml", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
        ("itp_local_one_local.yaml", "10.0.1.1:80"),
        ("itp_local_many_local.yaml", "10.0.1.1:80, 10.0.1.2:80"),
        ("itp_local_none_local.yaml", "DROP"),
    ],
)
def test_internal_traffic_policy_flows(fixture: str, output: str, tmp_path: Path) -> None:
    out = render(FIXTURES / fixture)
    run_flows(out, [("pod to ClusterIP", POD, "172.30.1.1", 80, output, False)])
    if output == "DROP":
        assert (
            '-A KUBE-SERVICES -m comment --comment "ns1/svc1 has no local endpoints"'
            " -m tcp -p tcp -d 172.30.1.1 --dport 80 -j DROP"
        ) in table(out, "filter")
    # Then the EndpointSlice is deleted: REJECT.
    docs = [
        d
        for d in yaml.safe_load_all((FIXTURES / fixture).read_text())
        if d["kind"] != "EndpointSlice"
    ]
    out = render(write_objects(tmp_path / "deleted.yaml", docs))
    run_flows(out, [("endpoints deleted", POD, "172.30.1.1", 80, "REJECT", False)])


B1, B2, B3 = (f"10.180.0.{i}:80, 10.180.1.{i}:80" for i in (1, 2, 3))
EXT = EXTERNAL_CLIENT
# TestInternalExternalMasquerade's flowTests (working local detector, no masqueradeAll).
MASQUERADE_FLOWS: list[Flow] = [
    ("pod to ClusterIP", POD, "172.30.0.41", 80, B1, False),
    ("pod to NodePort", POD, NODE_IP, 3001, B1, True),
    ("pod to LB", POD, "1.2.3.4", 80, B1, True),
    ("node to ClusterIP", NODE_IP, "172.30.0.41", 80, B1, True),
    ("node to NodePort", NODE_IP, NODE_IP, 3001, B1, True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, B1, True),
    ("node to LB", NODE_IP, "1.2.3.4", 80, B1, True),
    ("external to ClusterIP", EXT, "172.30.0.41", 80, B1, True),
    ("external to NodePort", EXT, NODE_IP, 3001, B1, True),
    ("external to LB", EXT, "1.2.3.4", 80, B1, True),
    ("pod to ClusterIP with eTP:Local", POD, "172.30.0.42", 80, B2, False),
    ("pod to NodePort with eTP:Local", POD, NODE_IP, 3002, B2, False),
    ("pod to LB with eTP:Local", POD, "5.6.7.8", 80, B2, False),
    ("node to ClusterIP with eTP:Local", NODE_IP, "172.30.0.42", 80, B2, True),
    ("node to NodePort with eTP:Local", NODE_IP, NODE_IP, 3001, B1, True),
    ("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, B2, True),
    ("node to LB with eTP:Local", NODE_IP, "5.6.7.8", 80, B2, True),
    ("external to ClusterIP with eTP:Local", EXT, "172.30.0.42", 80, B2, True),
    ("external to NodePort with eTP:Local", EXT, NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", EXT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", POD, "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", POD, NODE_IP, 3003, B3, True),
    ("pod to LB with iTP:Local", POD, "9.10.11.12", 80, B3, True),
    ("node to ClusterIP with iTP:Local", NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", NODE_IP, NODE_IP, 3003, B3, True),
    ("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, B3, True),
    ("node to LB with iTP:Local", NODE_IP, "9.10.11.12", 80, B3, True),
    ("external to ClusterIP with iTP:Local", EXT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", EXT, NODE_IP, 3003, B3, True),
    ("external to LB with iTP:Local", EXT, "9.10.11.12", 80, B3, True),
]
NO_DETECTOR: dict[str, tuple[str | None, bool | None]] = {
    "node to ClusterIP": (None, False),
    "node to ClusterIP with eTP:Local": (None, False),
    "node to ClusterIP with iTP:Local": (None, False),
    "external to ClusterIP": (None, False),
    "external to ClusterIP with eTP:Local": (None, False),
    "external to ClusterIP with iTP:Local": (None, False),
    "pod to NodePort with eTP:Local": ("10.180.0.2:80", None),
    "pod to LB with eTP:Local": ("10.180.0.2:80", None),
}
MASQUERADE_ALL: dict[str, tuple[str | None, bool | None]] = {
    "pod to ClusterIP": (None, True),
    "pod to ClusterIP with eTP:Local": (None, True),
    "pod to ClusterIP with iTP:Local": (None, True),
}
BOTH = {**MASQUERADE_ALL, **{k: v for k, v in NO_DETECTOR.items() if v[0] is not None}}


@pytest.mark.parametrize(
    ("flags", "overrides"),
    [
        (("--cluster-cidr", POD_CIDR), {}),
        ((), NO_DETECTOR),
        (("--cluster-cidr", POD_CIDR, "--masquerade-all"), MASQUERADE_ALL),
        (("--masquerade-all",), BOTH),
    ],
    ids=["base", "no LocalTrafficDetector", "masqueradeAll", "masqueradeAll, no detector"],
)
def test_internal_external_masquerade_flows(
    flags: tuple[str, ...], overrides: dict[str, tuple[str | None, bool | None]]
) -> None:
    flows = []
    for name, src, dst, port, output, masq in MASQUERADE_FLOWS:
        new_output, new_masq = overrides.get(name, (None, None))
        flows.append(
            (
                name,
                src,
                dst,
                port,
                output if new_output is None else new_output,
                masq if new_masq is None else new_masq,
            )
        )
    out = render(
        FIXTURES / "internal_external_masquerade.yaml",
        "--host-features",
        "nfacct",
        *flags,
        fake=False,
    )
    run_flows(out, flows)
