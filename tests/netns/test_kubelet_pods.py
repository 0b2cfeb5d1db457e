"""The kubelet for real: pods as processes in their own netns, on a bridge, probed.

Topology (nothing in the root namespace): a node namespace from the ``netns`` fixture;
the kubelet runs inside it (``nsenter --net``, so pod namespaces it creates are visible
to this test for cleanup); the fake apiserver runs in this test process but listens on
a socket created *inside* the node namespace (127.0.0.1 there), so only the kubelet can
reach it. Pod namespaces are named ``kpt-<pid>-<random>-<uid>``: unique per test, and
removed at teardown with every process in them.

Shows: a pod gets an IP from the podCIDR and serves the echo; the Node and its Lease
appear; readiness failure flips Ready; liveness failure restarts the container
(restartCount grows); a restarted kubelet adopts the running pod (same pid, one
process); deleting the pod (deletionTimestamp) kills it, frees its netns and deletes the
object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from pyroute2 import netns as pyroute2_netns

from kproxy.kernel.podnet import list_netns, netns_pids
from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require_commands
from tests.unit.client.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.netns

NODE = "node-1"
POD_CIDR = "10.250.0.0/24"
T = TypeVar("T")


class ApiThread:
    """The fake apiserver on its own loop thread, listening inside the node netns."""

    def __init__(self, node: Netns) -> None:
        self.fake = FakeApiServer()
        for plural, kind, api_version in (
            ("pods", "Pod", "v1"),
            ("nodes", "Node", "v1"),
            ("events", "Event", "v1"),
            ("leases", "Lease", "coordination.k8s.io/v1"),
        ):
            self.fake.register(plural, kind, api_version)
        sock = pyroute2_netns.create_socket(node.name)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sock = sock
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.fake.app(), shutdown_timeout=0.5)
            await self._runner.setup()
            await web.SockSite(self._runner, self._sock).start()
            self._started.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        async def read() -> dict[str, Any] | None:
            obj = self.fake.items[plural].get((namespace, name))
            return json.loads(json.dumps(obj)) if obj is not None else None

        return self.call(read())

    def close(self) -> None:
        async def stop() -> None:
            await self.fake.end_watches()
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # keep polling; report the last failure
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class KubeletProc:
    def __init__(self, node: Netns, api: ApiThread, tmp: Path, prefix: str) -> None:
        self.node, self.api, self.tmp, self.prefix = node, api, tmp, prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        self.kubeconfig = kubeconfig

    def start(self) -> None:
        self.runs += 1
        log = open(self.tmp / f"kubelet-{self.runs}.log", "wb")  # noqa: SIM115
        argv = [
            "nsenter", f"--net=/run/netns/{self.node.name}", "--",
            sys.executable, "-m", "kproxy.kubelet.command",
            "--kubeconfig", str(self.kubeconfig),
            "--hostname-override", NODE,
            "--node-ip", "127.0.0.1",
            "--root-dir", str(self.tmp / "root"),
            "--pod-cidr", POD_CIDR,
            "--bridge", "kpbr0",
            "--netns-prefix", self.prefix,
            "--address", "127.0.0.1",
            "--port", "10250",
            "--crash-backoff-initial", "0.5",
            "--crash-backoff-max", "2",
            "--sync-tick", "0.1",
            "--node-status-update-frequency", "1",
            "--node-lease-duration-seconds", "4",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )  # fmt: skip
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("kubelet-*.log")))


def node_http(node: Netns, url: str, timeout: float = 3.0) -> tuple[int, str]:
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen(sys.argv[1], timeout={timeout})\n"
        "    print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode(), end='')\n"
    )
    out = node.run([sys.executable, "-c", code, url], timeout=timeout + 10).stdout
    status, _, body = out.partition("\n")
    return int(status), body


@pytest.fixture
def cluster(netns: NetnsFactory, tmp_path: Path) -> Iterator[tuple[Netns, ApiThread, KubeletProc]]:
    require_commands("nsenter", "ip")
    node = netns()
    prefix = f"kpt-{os.getpid()}-{secrets.token_hex(3)}-"
    api = ApiThread(node)
    kubelet = KubeletProc(node, api, tmp_path, prefix)
    try:
        yield node, api, kubelet
    finally:
        kubelet.stop(signal.SIGKILL)
        api.close()
        for name in list_netns(prefix):
            for pid in netns_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
        assert not list_netns(prefix), "pod namespaces outlived the test"


def echo_pod(name: str, **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": NODE,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "echo",
                    "image": "kproxy/echo:latest",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    **container,
                }
            ],
        },
    }


def container_status(api: ApiThread, pod: str) -> dict[str, Any]:
    obj = api.get("pods", pod, "default") or {}
    statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def condition(api: ApiThread, pod: str, ctype: str) -> str:
    obj = api.get("pods", pod, "default") or {}
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == ctype:
            return str(c.get("status"))
    return ""


def test_kubelet_runs_probes_restarts_and_adopts(
    cluster: tuple[Netns, ApiThread, KubeletProc],
) -> None:
    node, api, kubelet = cluster
    kubelet.start()
    try:
        # The node registers and heartbeats.
        n = wait_for("node registration", lambda: api.get("nodes", NODE))
        assert n["metadata"]["labels"]["kubernetes.io/hostname"] == NODE
        wait_for("lease", lambda: api.get("leases", NODE, "kube-node-lease"))

        readiness = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1,
                     "failureThreshold": 1}  # fmt: skip
        api.call(api.fake.put("pods", echo_pod("web", readinessProbe=readiness)))
        wait_for("web Ready", lambda: condition(api, "web", "Ready") == "True")
        pod = api.get("pods", "web", "default") or {}
        ip = pod["status"]["podIP"]
        assert ip.startswith("10.250.0.") and ip != "10.250.0.1"
        assert pod["status"]["phase"] == "Running"
        status, body = node_http(node, f"http://{ip}:8080/")
        assert status == 200 and body.startswith("web saw 10.250.0.1:"), body

        # Readiness failure flips Ready (and the container is not restarted).
        node_http(node, f"http://{ip}:8080/control/ready/0")
        wait_for("web not Ready", lambda: condition(api, "web", "Ready") == "False")
        assert container_status(api, "web")["restartCount"] == 0
        node_http(node, f"http://{ip}:8080/control/ready/1")
        wait_for("web Ready again", lambda: condition(api, "web", "Ready") == "True")

        # Liveness failure restarts the container, again and again.
        marker = kubelet.tmp / "dead"
        liveness = {"exec": {"command": ["/bin/sh", "-c", f"test ! -e {marker}"]},
                    "periodSeconds": 1, "failureThreshold": 1}  # fmt: skip
        api.call(api.fake.put("pods", echo_pod("live", livenessProbe=liveness)))
        wait_for("live running", lambda: "running" in container_status(api, "live")["state"])
        marker.write_text("x")
        wait_for("restarts", lambda: container_status(api, "live")["restartCount"] >= 2, 60)
        marker.unlink()
        last = container_status(api, "live")["lastState"]["terminated"]
        assert last["exitCode"] in (0, 137, 143)

        # An image the kubelet cannot run waits with a pull error; logs are served.
        bad = echo_pod("bad")
        bad["spec"]["containers"][0]["image"] = "nginx:1.25"
        api.call(api.fake.put("pods", bad))
        wait_for(
            "pull error",
            lambda: (
                container_status(api, "bad").get("state", {}).get("waiting", {}).get("reason")
                in ("ErrImagePull", "ImagePullBackOff")
            ),
        )
        assert (api.get("pods", "bad", "default") or {})["status"]["phase"] == "Pending"
        logs_status, logs = node_http(node, "http://127.0.0.1:10250/containerLogs/default/web/echo")
        assert logs_status == 200 and "echo web: http :8080" in logs, logs

        # The kubelet API serves this node's pods.
        pods_status, pods_body = node_http(node, "http://127.0.0.1:10250/pods")
        assert pods_status == 200
        assert {p["metadata"]["name"] for p in json.loads(pods_body)["items"]} == {
            "web",
            "live",
            "bad",
        }

        # A restarted kubelet adopts the running pod: same pid, no duplicate.
        uid = pod["metadata"]["uid"]
        before = netns_pids(kubelet.prefix + uid)
        assert len(before) == 1, before
        kubelet.stop()
        kubelet.start()
        wait_for("adoption logged", lambda: "adopted container echo" in kubelet.logs(), 30)
        time.sleep(2)
        assert netns_pids(kubelet.prefix + uid) == before
        assert container_status(api, "web")["restartCount"] == 0
        status, body = node_http(node, f"http://{ip}:8080/")
        assert status == 200 and body.startswith("web saw")

        # Graceful delete: SIGTERM, netns gone, object deleted with grace 0.
        web_obj = api.get("pods", "web", "default") or {}
        web_obj["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        web_obj["metadata"]["deletionGracePeriodSeconds"] = 2
        api.call(api.fake.put("pods", web_obj))
        wait_for("web deleted", lambda: api.get("pods", "web", "default") is None, 30)
        wait_for("web netns gone", lambda: kubelet.prefix + uid not in list_netns(kubelet.prefix))
    except BaseException:
        print(kubelet.logs()[-6000:])
        print(json.dumps(api.get("pods", "web", "default"), indent=1))
        raise
