"""Fixtures shared by the proxy unit tests: object builders and upstream's normalisation.

``make_service`` / ``make_slice`` build JSON-shaped objects like upstream's
``makeTestService`` / ``makeTestEndpointSlice``.  ``sort_iptables_rules`` is a
port of upstream's ``sortIPTablesRules`` (proxier_test.go): upstream emits
services in Go map order, so its golden dumps are compared after sorting tables,
chains and the rules of KUBE-SERVICES / KUBE-NODEPORTS by service name.
"""

from __future__ import annotations

import re
from typing import Any

NODE_NAME = "test-node"
NODE_IP = "192.168.0.2"
POD_CIDR = "10.0.0.0/8"


def make_service(
    namespace: str,
    name: str,
    cluster_ip: str,
    *,
    port: int = 80,
    port_name: str = "p80",
    protocol: str = "TCP",
    nodePort: int = 0,
    ingress: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    svc_port: dict[str, Any] = {"name": port_name, "port": port, "protocol": protocol}
    if nodePort:
        svc_port["nodePort"] = nodePort
    body: dict[str, Any] = {
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"clusterIP": cluster_ip, "ports": [svc_port], **spec},
    }
    if ingress is not None:
        body["status"] = {"loadBalancer": {"ingress": ingress}}
    return body


def make_slice(
    namespace: str,
    service: str,
    index: int,
    endpoints: list[dict[str, Any]],
    *,
    port: int = 80,
    port_name: str = "p80",
    protocol: str = "TCP",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": namespace,
            "name": f"{service}-{index}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": port_name, "port": port, "protocol": protocol}],
    }


_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')


def _comment(rule: str) -> str | None:
    m = _COMMENT.search(rule)
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def _service_key(rule: str) -> str | None:
    c = _comment(rule)
    if c is None:
        return None
    return re.split(r"[ :]", c, maxsplit=1)[0]


def _stable_sort_by_service(rules: list[str], *, last_marker: str | None = None) -> list[str]:
    # Upstream's comparator returns false when either rule has no comment, which
    # makes such rules "equal" to everything; insertion sort reproduces the
    # stable-sort result for the inputs these tests use.
    def less(a: str, b: str) -> bool:
        if last_marker is not None:
            ca, cb = _comment(a) or "", _comment(b) or ""
            if last_marker in ca:
                return False
            if last_marker in cb:
                return True
        ka, kb = _service_key(a), _service_key(b)
        if ka is None or kb is None:
            return False
        return ka < kb

    out: list[str] = []
    for rule in rules:
        i = len(out)
        while i > 0 and less(rule, out[i - 1]):
            i -= 1
        out.insert(i, rule)
    return out


def _chain_order(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return (0, "")
    if name == "KUBE-SERVICES":
        return (1, "")
    return (2 if name.startswith("KUBE-") else 3, name)


def sort_iptables_rules(data: str) -> str:
    """Upstream's ``sortIPTablesRules``: a restore input in canonical order."""
    tables: list[tuple[str, list[str], dict[str, list[str]], list[str]]] = []
    for block in data.lstrip("\n").split("COMMIT\n"):
        if not block.strip():
            continue
        lines = block.strip("\n").split("\n")
        name = lines[0][1:]
        chains: list[str] = []
        rules: dict[str, list[str]] = {}
        other: list[str] = []
        for line in lines[1:]:
            if line.startswith(":"):
                chain = line[1:].split(" ", 1)[0]
                chains.append(chain)
                rules.setdefault(chain, [])
            elif line.startswith("-A "):
                rules.setdefault(line.split(" ", 2)[1], []).append(line)
            else:
                other.append(line)
        tables.append((name, chains, rules, other))
    tables.sort(key=lambda t: t[0])
    out: list[str] = []
    for name, chains, rules, other in tables:
        for chain in ("KUBE-NODEPORTS", "KUBE-SERVICES"):
            if chain in rules:
                marker = (
                    "must be the last rule" if name == "nat" and chain == "KUBE-SERVICES" else None
                )
                rules[chain] = _stable_sort_by_service(rules[chain], last_marker=marker)
        ordered = sorted(chains, key=_chain_order)
        out.append(f"*{name}")
        out.extend(f":{c} - [0:0]" for c in ordered)
        for c in ordered:
            out.extend(rules.get(c, []))
        out.extend(other)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def dedent_rules(text: str) -> str:
    """Strip the indentation of a golden dump written inside a test."""
    return "\n".join(line.strip() for line in text.strip("\n").split("\n")) + "\n"


def test_options(**overrides: Any) -> Any:
    """Upstream's ``NewFakeProxier`` settings as render options."""
    from kproxy.proxy.iptables import LocalDetector, RenderOptions

    base: dict[str, Any] = {
        "masquerade_mark": "0x4000",
        "local_detector": LocalDetector.by_cidr(POD_CIDR),
        "node_ip": NODE_IP,
        "node_name": NODE_NAME,
        "localhost_nodeports": True,
        "nfacct_ct_state_invalid": True,
        "nfacct_localhost_nodeports": True,
    }
    base.update(overrides)
    return RenderOptions(**base)


test_options.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def snapshot(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(ServicePortMap, EndpointsMap) holding exactly these objects."""
    from kproxy.proxy.endpoints import EndpointsChangeTracker, EndpointsMap
    from kproxy.proxy.services import ServiceChangeTracker, ServicePortMap

    st = ServiceChangeTracker()
    for svc in services:
        st.update(None, svc)
    et = EndpointsChangeTracker(NODE_NAME)
    for es in slices:
        et.endpoint_slice_update(es)
    spm, em = ServicePortMap(), EndpointsMap()
    spm.update(st)
    em.update(et)
    return spm, em


def overall_objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``TestOverallIPTablesRules``'s six Services and five EndpointSlices."""
    services = [
        make_service("ns1", "svc1", "172.30.0.41"),
        make_service(
            "ns2",
            "svc2",
            "172.30.0.42",
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            nodePort=3001,
            ingress=[{"ip": "1.2.3.4"}],
            externalIPs=["192.168.99.22"],
            healthCheckNodePort=30000,
        ),
        make_service("ns3", "svc3", "172.30.0.43", type="NodePort", nodePort=3003),
        make_service("ns4", "svc4", "172.30.0.44", type="NodePort", externalIPs=["192.168.99.33"]),
        make_service(
            "ns5",
            "svc5",
            "172.30.0.45",
            type="LoadBalancer",
            externalTrafficPolicy="Cluster",
            nodePort=3002,
            ingress=[{"ip": "5.6.7.8"}],
            healthCheckNodePort=30000,
            loadBalancerSourceRanges=[" 203.0.113.0/25"],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
        ),
        make_service("ns6", "svc6", "172.30.0.46", type="ClusterIP"),
    ]
    slices = [
        make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}]),
        make_slice("ns2", "svc2", 1, [{"addresses": ["10.180.0.2"]}]),
        make_slice("ns3", "svc3", 1, [{"addresses": ["10.180.0.3"]}]),
        make_slice(
            "ns4",
            "svc4",
            1,
            [{"addresses": ["10.180.0.4"]}, {"addresses": ["10.180.0.5"], "nodeName": NODE_NAME}],
        ),
        make_slice("ns5", "svc5", 1, [{"addresses": ["10.180.0.3"]}]),
    ]
    return services, slices
