"""`make demo`: a whole kproxy cluster on this machine, inside throwaway network namespaces.

:func:`kproxy.localcluster.cluster_up` (what ``kproxy cluster up`` runs) brings up a
hub namespace with ``kproxy apiserver`` (the embedded SQLite store, TLS), ``kproxy
controller-manager`` and ``kproxy scheduler``, and two node namespaces, each running
``kproxy kubelet`` (pods are processes in their own network namespaces, on the node's
bridge, with IPs from the node's podCIDR) and ``kproxy proxy``;
the nodes route each other's podCIDRs ("host-gw").

Then a Deployment and a NodePort Service are applied (with kubectl when it is
installed, else with kproxy's client), and for each proxy mode this machine can run
(iptables, then userspace; IPVS needs a kernel with ip_vs, see the vm tier) the proxies
are (re)started in that mode, requests to the ClusterIP from each node and to the
NodePort from the hub (outside the nodes) are counted by the pod and node that
answered, and the node's rules for the Service are printed. A pod is then deleted and
the traffic follows its replacement. Everything is removed at the end, even on failure
or Ctrl-C; the host's own network namespace is never touched. Bounded: each wait has a
timeout, and the whole run is cut off after ``DEADLINE_S``.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kproxy.client.rest import DEPLOYMENTS, PODS, SERVICES
from kproxy.localcluster import HUB_IP, Agent, Cluster, cluster_up, wait_for

DEADLINE_S = 180
REPLICAS = 4
MODES = ("iptables", "userspace")
MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: %(replicas)d
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              labelSelector: {matchLabels: {app: web}}
              topologyKey: kubernetes.io/hostname
      containers:
      - name: echo
        image: kproxy/echo:latest
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /readyz, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
"""


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _deadline(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"demo: over its {DEADLINE_S}s budget")


def apply(c: Cluster, workdir: Path) -> None:
    manifest = workdir / "web.yaml"
    manifest.write_text(MANIFEST % {"replicas": REPLICAS})
    if shutil.which("kubectl"):
        print(f"$ kubectl apply -f {manifest}")
        res = c.kubectl("apply", "-f", str(manifest))
        print(res.stdout.strip() or res.stderr.strip())
        if res.returncode != 0:
            raise SystemExit("demo: kubectl apply failed")
        return
    import yaml

    print("(kubectl is not installed: creating the objects with kproxy's client)")
    assert c.api is not None
    for doc in yaml.safe_load_all(manifest.read_text()):
        resource = DEPLOYMENTS if doc["kind"] == "Deployment" else SERVICES
        c.api.create(resource, doc)
        print(f"{doc['kind'].lower()}/{doc['metadata']['name']} created")


def web_pods(c: Cluster) -> dict[str, dict[str, Any]]:
    assert c.api is not None
    return {
        p["metadata"]["name"]: p
        for p in c.api.list(PODS, label_selector="app=web")
        if not p["metadata"].get("deletionTimestamp")
    }


def all_ready(c: Cluster) -> dict[str, dict[str, Any]] | None:
    pods = web_pods(c)
    ready = [
        p
        for p in pods.values()
        if any(
            x.get("type") == "Ready" and x.get("status") == "True"
            for x in (p.get("status") or {}).get("conditions") or ()
        )
    ]
    return pods if len(pods) == REPLICAS and len(ready) == REPLICAS else None


def show_pods(c: Cluster) -> None:
    if shutil.which("kubectl"):
        print(c.kubectl("get", "pods", "-o", "wide").stdout.rstrip())
        return
    for name, p in sorted(web_pods(c).items()):
        print(f"{name:28} {p['status'].get('podIP', ''):14} {p['spec'].get('nodeName', '')}")


def spread(agent: Agent, ip: str, port: int, c: Cluster, n: int = 30) -> collections.Counter[str]:
    """Who answered ``n`` requests: ``pod@node`` (or the failure)."""
    where = {name: p["spec"].get("nodeName", "?") for name, p in web_pods(c).items()}
    out: collections.Counter[str] = collections.Counter()
    for r in agent.get(ip, port, count=n, max_failures=n, timeout=1.0):
        out[f"{r.pod}@{where.get(r.pod, '?')}" if r.pod else f"failed({r.body[:40]})"] += 1
    return out


def on_both_nodes(counts: collections.Counter[str]) -> bool:
    nodes = {k.rpartition("@")[2] for k in counts}
    return nodes == {"node-1", "node-2"}


def rules(c: Cluster, mode: str) -> str:
    save = c.save("node-1", "nat")
    if mode == "iptables":
        keep = [ln for ln in save.splitlines() if "default/web" in ln]
    else:  # the userspace mode redirects Service traffic to its own listening ports
        keep = [ln for ln in save.splitlines() if ln.startswith("-A KUBE-") and "web" in ln]
    return "\n".join(keep) or "(none)"


def main() -> None:
    kproxy = str(Path(sys.executable).with_name("kproxy"))
    print(subprocess.run([kproxy, "version"], capture_output=True, text=True).stdout.strip())
    step("bring up: hub (apiserver on SQLite, controller-manager, scheduler) + 2 nodes")
    t0 = time.monotonic()
    with cluster_up(name="kpdemo", proxy_mode=MODES[0]) as c:
        print(f"up in {time.monotonic() - t0:.1f}s; logs and PKI under {c.workdir}")
        print(f"hub {c.hub}: apiserver {c.apiserver_url} ({HUB_IP} exists only in the hub)")
        for node in c.nodes.values():
            print(f"{node.name}: netns {node.ns}, IP {node.ip}, podCIDR {node.pod_cidr}")
        if shutil.which("kubectl"):
            print(c.kubectl("get", "nodes", "-o", "wide").stdout.rstrip())

        step(f"apply a Deployment ({REPLICAS} echo pods) and a NodePort Service")
        apply(c, c.workdir)
        wait_for(f"{REPLICAS} ready web pods", lambda: all_ready(c), 60)
        show_pods(c)
        assert c.api is not None
        svc = c.api.get(SERVICES, "web") or {}
        cluster_ip = str(svc["spec"]["clusterIP"])
        node_port = int(svc["spec"]["ports"][0]["nodePort"])
        outside = Agent(c.hub)  # the hub is outside every node: an external client
        try:
            for mode in MODES:
                if c.proxy_mode != mode:
                    step(f"restart both proxies with --proxy-mode {mode} (after --cleanup)")
                    c.switch_proxy_mode(mode)
                for name in ("node-1", "node-2"):
                    agent = c.nodes[name].agent
                    assert agent is not None
                    step(f"{mode}: 30 requests from {name} to ClusterIP {cluster_ip}:80")

                    def both(a: Agent = agent) -> collections.Counter[str] | None:
                        n = spread(a, cluster_ip, 80, c)
                        return n if on_both_nodes(n) else None

                    counts = wait_for("answers from pods on both nodes", both, 30)
                    print(dict(sorted(counts.items())))
                target = c.nodes["node-1"].ip
                step(f"{mode}: 30 requests from the hub to NodePort {target}:{node_port}")
                print(dict(sorted(spread(outside, target, node_port, c).items())))
                step(f"{mode}: node-1's proxy: /proxyMode, /healthz and sync metrics")
                n1 = c.nodes["node-1"]
                assert n1.agent is not None
                for port, path in ((10249, "/proxyMode"), (10256, "/healthz")):
                    [r] = n1.agent.get(n1.ip, port, path)
                    shown = (
                        r.body.strip()
                        if path == "/proxyMode"
                        else "(ok)"
                        if r.status == 200
                        else r.body
                    )
                    print(f"http://{n1.ip}:{port}{path} -> {r.status} {shown}")
                [m] = n1.agent.get(n1.ip, 10249, "/metrics")
                for line in m.body.splitlines():
                    if line.startswith("kubeproxy_sync_proxy_rules_duration_seconds_count"):
                        print(line)
                step(f"{mode}: node-1's nat rules for default/web")
                print(rules(c, mode))

            step("delete one pod: the ReplicaSet replaces it and the traffic follows")
            victim = sorted(web_pods(c))[0]
            c.api.delete(PODS, victim)
            wait_for(
                "a replacement, ready",
                lambda: (p := all_ready(c)) is not None and victim not in p,
                60,
            )
            agent = c.nodes["node-1"].agent
            assert agent is not None

            def followed(a: Agent = agent) -> collections.Counter[str] | None:
                n = spread(a, cluster_ip, 80, c)
                ok = all("@" in k and not k.startswith(victim) for k in n)
                return n if ok else None

            counts = wait_for(f"no answer from {victim}", followed, 30)
            print(dict(sorted(counts.items())))
            show_pods(c)
        finally:
            outside.close()
        step("tear down")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("demo: needs root (it creates network namespaces)")
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(DEADLINE_S)
    t_start = time.monotonic()
    try:
        main()
    finally:
        signal.alarm(0)
        print(
            f"\ncleaned up: every kpdemo-{os.getpid()}-* namespace removed "
            f"({time.monotonic() - t_start:.0f}s; host namespace untouched)"
        )
