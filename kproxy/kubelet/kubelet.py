"""The kubelet: wires the node agent, the pod network, the pod workers and the API server.

Owns :class:`KubeletConfig` and :class:`Kubelet`. Start-up order, each step before the
next:

1. the kubelet API (so ``/healthz`` answers while the rest comes up);
2. registration of the Node, then the Lease and status loops;
3. the podCIDR (``--pod-cidr`` or the Node's ``spec.podCIDR``), the bridge, IPAM,
   ``ip_forward=1`` (and, if asked, MASQUERADE for traffic leaving the podCIDR);
4. the pod records under ``--root-dir`` are loaded, *then* the pod informer
   (``spec.nodeName=<node>``) starts: a pod it lists that has a record is adopted (its
   live processes kept, not restarted), one without gets a fresh worker;
5. once the informer synced: records of pods the API no longer has are terminated,
   namespaces with our prefix that no record explains are emptied and removed, and
   IP allocations that no pod owns are freed.

Invariants: at most one worker per pod uid; a pod is never started twice (adoption
comes before any start); shutting the kubelet down stops the workers without touching
their pods, which the next kubelet adopts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from kproxy.client.informer import FuncHandler, Informer, RestListerWatcher
from kproxy.client.rest import PODS, RestClient
from kproxy.kernel import sysctl
from kproxy.kernel.podnet import PodNet, host_if_name, list_netns, netns_pids
from kproxy.kubelet import podspec
from kproxy.kubelet.ipam import Ipam
from kproxy.kubelet.node import NodeAgent, NodeConfig
from kproxy.kubelet.pod import PodRuntime, PodWorker
from kproxy.kubelet.server import KubeletServer, load_tokens, server_ssl_context
from kproxy.kubelet.state import PodRecord, StateDir

log = logging.getLogger(__name__)
Obj = dict[str, Any]
TERMINAL = ("Succeeded", "Failed")


@dataclass
class KubeletConfig:
    node: NodeConfig
    root_dir: Path
    pod_cidr: str = ""
    bridge: str = "kproxy0"
    netns_prefix: str = "kproxy-"
    address: str = "0.0.0.0"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    token_file: Path | None = None
    tick: float = 0.5
    backoff_initial: float = 10.0
    backoff_cap: float = 300.0
    masquerade: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Kubelet:
    def __init__(self, client: RestClient, cfg: KubeletConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.agent = NodeAgent(client, cfg.node)
        self.state = StateDir(cfg.root_dir)
        self.workers: dict[str, PodWorker] = {}
        self.records: dict[str, PodRecord] = {}
        self.runtime: PodRuntime | None = None
        self.informer: Informer | None = None
        self.server: KubeletServer | None = None
        self.ready = asyncio.Event()  # pods are being synced
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------- run

    async def run(self) -> None:
        try:
            await self._start_server()
            if self.cfg.node.register:
                self.agent.not_ready_message = "pod network not ready"
                await self.agent.register()
            self._spawn(self.agent.lease_loop(), "lease")
            self._spawn(self.agent.status_loop(), "node-status")
            cidr = IPv4Network(self.cfg.pod_cidr or await self.agent.pod_cidr(), strict=False)
            self.runtime = await self._pod_network(cidr)
            self.agent.not_ready_message = ""
            with contextlib.suppress(Exception):
                await self.agent.write_status()
            self.records = {r.uid: r for r in self.state.load_all()}
            self.informer = Informer(
                RestListerWatcher(
                    self.client, PODS, field_selector=f"spec.nodeName={self.cfg.node.name}"
                ),
                name=f"kubelet-pods:{self.cfg.node.name}",
            )
            self.informer.add_handler(
                FuncHandler(add=self._on_pod, update=self._on_update, delete=self._on_delete)
            )
            self.informer.start()
            await self.informer.wait_synced()
            await self._cleanup_unknown()
            self.ready.set()
            await asyncio.Event().wait()  # until cancelled
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop everything this process runs; pods keep running for the next kubelet."""
        if self.informer is not None:
            await self.informer.stop()
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"kubelet:{name}"))

    async def _start_server(self) -> None:
        cfg = self.cfg
        ctx = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            ctx = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.client_ca)
        tokens = load_tokens(cfg.token_file) if cfg.token_file is not None else None
        self.server = KubeletServer(
            self, host=cfg.address, port=cfg.node.port, ssl_context=ctx,
            client_ca=ctx is not None and cfg.client_ca is not None, tokens=tokens,
        )  # fmt: skip
        await self.server.start()

    async def _pod_network(self, cidr: IPv4Network) -> PodRuntime:
        podnet = PodNet(self.cfg.bridge)
        ipam = Ipam(self.cfg.root_dir / "ipam" / self.cfg.bridge, cidr)
        await asyncio.to_thread(podnet.ensure_bridge, ipam.gateway)
        sysctl.ensure("net.ipv4.ip_forward", "1")
        if self.cfg.masquerade:
            from kproxy.kernel.iptables import Iptables, RulePosition

            rule = ["-s", str(cidr), "!", "-d", str(cidr), "-m", "comment",
                    "--comment", "kproxy pod egress", "-j", "MASQUERADE"]  # fmt: skip
            await asyncio.to_thread(
                Iptables("ipv4").ensure_rule, RulePosition.APPEND, "nat", "POSTROUTING", rule
            )
        log.info("pod network: bridge %s %s", self.cfg.bridge, ipam.gateway)
        return PodRuntime(
            podnet=podnet,
            ipam=ipam,
            state=self.state,
            client=self.client,
            host_ip=self.cfg.node.node_ip,
            netns_prefix=self.cfg.netns_prefix,
            tick=self.cfg.tick,
            backoff_initial=self.cfg.backoff_initial,
            backoff_cap=self.cfg.backoff_cap,
        )

    # ----------------------------------------------------------------- pods

    def _on_update(self, _old: Obj, new: Obj) -> None:
        self._on_pod(new)

    def _on_pod(self, pod: Obj) -> None:
        uid = str(podspec.meta(pod).get("uid") or "")
        if not uid or self.runtime is None:
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        record = self.records.pop(uid, None)
        phase = str((pod.get("status") or {}).get("phase") or "")
        if record is None and phase in TERMINAL:
            return  # finished before this kubelet started: nothing to run or adopt
        self._start_worker(pod, record)

    def _start_worker(self, pod: Obj, record: PodRecord | None) -> PodWorker:
        assert self.runtime is not None
        worker = PodWorker(pod, self.runtime, record)
        self.workers[worker.uid] = worker
        worker.start()

        def done(_: asyncio.Task[None]) -> None:
            if self.workers.get(worker.uid) is worker and worker.terminated:
                del self.workers[worker.uid]

        worker.add_done_callback(done)
        return worker

    def _on_delete(self, pod: Obj) -> None:
        worker = self.workers.get(str(podspec.meta(pod).get("uid") or ""))
        if worker is not None:
            worker.api_deleted()

    async def _cleanup_unknown(self) -> None:
        """Terminate what a previous kubelet ran for pods the API no longer has."""
        stale = list(self.records.values())
        self.records.clear()
        for record in stale:
            log.info("pod %s/%s (%s) is gone from the API; terminating its leftovers",
                     record.namespace, record.name, record.uid)  # fmt: skip
            pod: Obj = {
                "metadata": {"uid": record.uid, "namespace": record.namespace,
                             "name": record.name},
                "spec": {"terminationGracePeriodSeconds": 2,
                         "containers": [{"name": n} for n in record.containers]},
            }  # fmt: skip
            self._start_worker(pod, record).api_deleted()
        known = set(self.workers)
        prefix = self.cfg.netns_prefix
        for name in list_netns(prefix):
            uid = name[len(prefix) :]
            if uid in known:
                continue
            log.info("netns %s belongs to no pod; removing it", name)
            for pid in netns_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert self.runtime is not None
            await asyncio.to_thread(self.runtime.podnet.teardown_pod, name, host_if_name(uid))
        assert self.runtime is not None
        for owner in set(self.runtime.ipam.allocations().values()) - known:
            self.runtime.ipam.release(owner)

    # ------------------------------------------------------------ API views

    def pod_list(self) -> list[Obj]:
        return [{**w.pod, "status": w.status()} for w in self.workers.values()]

    def log_file(self, namespace: str, pod: str, container: str, previous: bool) -> Path | None:
        for w in self.workers.values():
            if w.record.namespace != namespace or w.record.name != pod:
                continue
            for c in w.containers:
                if c.name != container or not c.ever_started:
                    continue
                restart = c.restart_count - (1 if previous else 0)
                if restart < 0:
                    return None
                path = self.state.log_path(w.uid, container, restart)
                return path if path.exists() else None
        return None
