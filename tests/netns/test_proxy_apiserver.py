"""``kproxy proxy --kubeconfig`` follows a real ``kproxy apiserver``, both inside the
node namespace, and survives the apiserver's restart.

Everything runs inside the test's own namespaces: the apiserver listens on the node
namespace's 127.0.0.1 (TLS on ``APISERVER_PORT`` with the ``admin.kubeconfig`` it
generates in a temporary data dir, plus a plain-HTTP port there for its health
check), the proxy uses that kubeconfig, and objects are written through the
apiserver by a small helper process started in the node namespace that uses kproxy's
REST client with the same kubeconfig.

One scenario, in order (each step waits for the proxy's sync gauges, then checks the
node's ``iptables-save`` and real traffic from a client namespace):

1. a Service with an EndpointSlice of pod1+pod2 appears → rules and traffic;
2. the slice changes to pod3 → only pod3 answers;
3. the apiserver is killed (SIGKILL) → the proxy stays up and traffic still flows;
   it is started again on the same data dir (sqlite) → the proxy reconnects and the
   node's rules, normalized, are the same as before the restart;
4. a change after the restart (back to pod1) arrives → the proxy really follows the
   new apiserver, not just its old cache;
5. the Service and slice are deleted → their rules go and the ClusterIP is refused.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster_topology import (
    ECHO_PORT,
    KPROXY,
    NODE_NAME,
    Cluster,
    cluster_topology,
    endpoint_slice,
    node_object,
    pod_ip,
    service,
)

pytestmark = pytest.mark.netns

APISERVER_PORT = 6443
APISERVER_HTTP_PORT = 8085  # health only, on the node namespace's loopback
VIP = "10.96.0.50"
PORTS = [{"name": "http", "port": 80, "targetPort": ECHO_PORT, "protocol": "TCP"}]
SLICE_PORTS = [{"name": "http", "port": ECHO_PORT, "protocol": "TCP"}]

# Runs in the node namespace: apply (create or update) / delete objects through the
# apiserver with kproxy's REST client. argv: kubeconfig, JSON list of operations.
WRITER = r"""
import asyncio, json, sys
from kproxy.client.errors import Conflict, NotFound
from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import ENDPOINTSLICES, NODES, SERVICES, RestClient

KINDS = {"Service": SERVICES, "EndpointSlice": ENDPOINTSLICES, "Node": NODES}

async def main(path, ops):
    async with RestClient(load_kubeconfig(path), request_timeout=10) as c:
        for op in ops:
            obj = op["object"]
            res, name = KINDS[obj["kind"]], obj["metadata"]["name"]
            ns = obj["metadata"].get("namespace")
            if op["op"] == "delete":
                await c.delete(res, name, ns)
                continue
            for _ in range(10):
                try:
                    cur = await c.get(res, name, ns)
                except NotFound:
                    await c.create(res, obj, ns)
                    break
                body = json.loads(json.dumps(obj))
                body["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                if obj["kind"] == "Service":  # immutable once allocated
                    body["spec"]["clusterIP"] = cur["spec"]["clusterIP"]
                try:
                    await c.update(res, body, ns)
                    break
                except Conflict:
                    continue
            else:
                raise SystemExit(f"could not apply {name}")

asyncio.run(asyncio.wait_for(main(sys.argv[1], json.loads(sys.argv[2])), 30))
"""


def _web(pods: Sequence[int]) -> list[dict[str, Any]]:
    return [
        service("web", VIP, PORTS, type="ClusterIP"),
        endpoint_slice("web", [(pod_ip(i), NODE_NAME) for i in pods], SLICE_PORTS),
    ]


def normalized(save: str) -> list[str]:
    """``iptables-save`` without comments and counters, in a stable order: what a
    restart must not change."""
    out = []
    for line in save.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.split(" [", 1)[0]
        out.append(re.sub(r"\[\d+:\d+\] ", "", line))
    return out


class Apiserver:
    """``kproxy apiserver`` in the node namespace on a fixed data dir; restartable."""

    def __init__(self, cluster: Cluster, data_dir: Path) -> None:
        self.cluster = cluster
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "admin.kubeconfig"

    def start(self) -> None:
        assert self.proc is None
        self.starts += 1
        log = self.cluster._log(f"apiserver-{self.starts}.log")  # closed with the cluster's
        self.proc = self.cluster.node.popen(
            [
                str(KPROXY),
                "apiserver",
                "--storage-backend=sqlite",
                f"--data-dir={self.data_dir}",
                "--bind-address=127.0.0.1",
                f"--secure-port={APISERVER_PORT}",
                f"--insecure-port={APISERVER_HTTP_PORT}",
                "--insecure-bind-address=127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            res = self.cluster.node_agent.get("127.0.0.1", APISERVER_HTTP_PORT, "/healthz", 1.0)
            if res.status == 200 and self.kubeconfig.exists():
                return
            assert self.proc.poll() is None, f"apiserver exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"apiserver not healthy:\n{self.log()}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def log(self) -> str:
        path = self.cluster.workdir / f"apiserver-{self.starts}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
        return "<no log>"

    def write(self, ops: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        payload = json.dumps([{"op": op, "object": obj} for op, obj in ops])
        res = self.cluster.node.run(
            [sys.executable, "-c", WRITER, str(self.kubeconfig), payload],
            check=False,
            timeout=60,
        )
        assert res.returncode == 0, f"writer failed:\n{res.stderr[-2000:]}\n{self.log()}"


@pytest.fixture(params=["legacy", "nft"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Cluster, Apiserver]]:
    backend = str(request.param)
    data_dir = tmp_path / "apiserver"
    with cluster_topology(
        tmp_path,
        backend=backend,
        objects=(),
        n_pods=3,
        n_clients=1,
        kubeconfig=data_dir / "admin.kubeconfig",
        start_proxy=False,
    ) as cluster:
        api = Apiserver(cluster, data_dir)
        try:
            api.start()
            api.write([("apply", node_object())])
            cluster.start_proxy()
            yield cluster, api
            status = cluster.stop_proxy()
            assert status == 0, f"proxy exited {status} on SIGTERM:\n{cluster.proxy_log()}"
        finally:
            api.kill()


def _answers(cluster: Cluster, count: int = 12) -> set[str]:
    """Which pods answered ``count`` connections to the VIP (failures as outcomes)."""
    seen = set()
    for a in cluster.ask_tcp_many(0, VIP, 80, count):
        seen.add(a.pod if a.outcome == "ok" else a.outcome)
    return seen


def _wait_watches(cluster: Cluster, count: int, timeout: float) -> float:
    """Seconds until the proxy holds ``count`` established connections to the apiserver
    (one per watch: HTTP/1.1 streams are not multiplexed)."""
    assert cluster.proxy is not None
    mark, start = f"pid={cluster.proxy.pid},", time.monotonic()
    while True:
        out = cluster.node.run(
            ["ss", "-Htnp", "state", "established", f"( dport = :{APISERVER_PORT} )"]
        ).stdout
        if sum(mark in line for line in out.splitlines()) >= count:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"proxy did not reconnect:\n{out}"
        cluster.assert_proxy_alive()
        time.sleep(0.1)


def _dnat_to(nat: str) -> set[str]:
    """The pod IPs the Service's endpoint chains DNAT to."""
    return set(re.findall(rf"--to-destination ([\d.]+):{ECHO_PORT}", nat))


def _sync(
    cluster: Cluster,
    api: Apiserver,
    ops: Sequence[tuple[str, Mapping[str, Any]]],
    expect: Callable[[str], bool],
) -> str:
    """Write ``ops``, wait for a sync, then for the node's nat table to satisfy
    ``expect``: several objects arrive as several events, and the gauges may report
    the sync of the first before the last has arrived."""
    cluster.expect_change()
    api.write(ops)
    cluster.wait_synced(timeout=20)
    deadline = time.monotonic() + 10
    while not expect(nat := cluster.save("nat")):
        assert time.monotonic() < deadline, f"rules never converged:\n{nat}"
        time.sleep(0.1)
    return nat


def test_proxy_follows_the_apiserver_and_survives_its_restart(
    stack: tuple[Cluster, Apiserver],
) -> None:
    cluster, api = stack
    started = time.monotonic()
    assert "default/web" not in cluster.save("nat")

    # 1. created
    nat = _sync(
        cluster,
        api,
        [("apply", o) for o in _web([1, 2])],
        lambda nat: _dnat_to(nat) == {pod_ip(1), pod_ip(2)},
    )
    assert "default/web:http cluster IP" in nat and f"-d {VIP}/32" in nat, nat
    assert _answers(cluster) == {"pod1", "pod2"}

    # 2. changed
    _sync(cluster, api, [("apply", _web([3])[1])], lambda nat: _dnat_to(nat) == {pod_ip(3)})
    assert _answers(cluster) == {"pod3"}
    before = normalized(cluster.save())

    # 3. apiserver crash and restart on the same sqlite file
    api.kill()
    time.sleep(2.0)  # long enough for the proxy's watch to break and its retries to fail
    cluster.assert_proxy_alive()
    assert _answers(cluster) == {"pod3"}, "rules must stay while the apiserver is away"
    api.start()
    # The proxy's informers come back on their own (jittered backoff): wait until it
    # holds its three watches (services, endpointslices, its node) to the new process,
    # then give it a full sync period; the rules must be exactly as they were.
    reconnected_in = _wait_watches(cluster, 3, timeout=30)
    time.sleep(2.0)  # > --iptables-sync-period (1 s): a periodic full sync has run
    cluster.assert_proxy_alive()
    after = normalized(cluster.save())
    assert after == before, "\n".join(
        ["rules changed across the apiserver restart:"]
        + [f"- {line}" for line in before if line not in after]
        + [f"+ {line}" for line in after if line not in before]
    )

    # 4. a change made through the restarted apiserver reaches the node
    _sync(cluster, api, [("apply", _web([1])[1])], lambda nat: _dnat_to(nat) == {pod_ip(1)})
    assert _answers(cluster) == {"pod1"}

    # 5. deleted
    _sync(
        cluster,
        api,
        [("delete", o) for o in reversed(_web([1]))],
        lambda nat: "default/web" not in nat,
    )
    assert _answers(cluster, 3) - {"pod1", "pod2", "pod3"}, "the VIP must not answer now"
    cluster.assert_proxy_alive()
    reconnects = cluster.proxy_log(400).count("watch broke")
    relists = cluster.proxy_log(400).count("relisting")
    print(
        f"\n[{cluster.backend}] apiserver restarts: {api.starts - 1}; proxy watches back "
        f"{reconnected_in:.1f} s after the restart; watch breaks logged: {reconnects}; "
        f"relists logged: {relists}; scenario {time.monotonic() - started:.1f} s"
    )
