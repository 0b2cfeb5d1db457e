"""One pod on this node: its sandbox, its containers' processes, probes and status.

Owns :class:`PodRuntime` (what every pod worker shares: the pod network, IPAM, the
state dir, the API client, the clock and the knobs) and :class:`PodWorker`, one
asyncio task per pod that loops (bounded by a tick) over:

1. the sandbox: netns ``<prefix><uid>``, veth into the bridge, an IP from IPAM;
2. containers: reap exits, start what should run (per ``restartPolicy`` and back-off),
   escalate SIGTERM to SIGKILL past a deadline, act on liveness failures;
3. probes: start the due ones as tasks, feed results back;
4. status: written through ``pods/<name>/status`` only when it changed.

Termination (a ``deletionTimestamp``, or the API object vanishing): SIGTERM every
container, SIGKILL after the grace period, tear the sandbox down, free the IP, drop
the state; then, if the API object still exists, report the final status and delete
it with grace 0.

Invariants: the pod record (:mod:`.state`) is saved after every spawn and before the
sandbox is created, so nothing this worker makes can be orphaned by a crash; stopping
the worker *without* terminating (kubelet shutdown) leaves processes and namespaces
running for the next kubelet to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from kproxy.client.errors import ClientError, NotFound
from kproxy.client.rest import PODS, RestClient
from kproxy.kernel.podnet import PodNet, PodNetError, host_if_name, netns_argv, netns_exists
from kproxy.kubelet import podspec
from kproxy.kubelet.backoff import CrashBackoff
from kproxy.kubelet.container import Container
from kproxy.kubelet.images import ImageError, container_argv, resolve
from kproxy.kubelet.ipam import Ipam, IpamError
from kproxy.kubelet.probes import ProbeTarget, ProbeTracker, run_handler
from kproxy.kubelet.process import Process
from kproxy.kubelet.state import ContainerRecord, PodRecord, StateDir
from kproxy.kubelet.status import now_rfc3339, pod_status

log = logging.getLogger(__name__)
Obj = dict[str, Any]


@dataclass
class PodRuntime:
    podnet: PodNet
    ipam: Ipam
    state: StateDir
    client: RestClient | None
    host_ip: str
    netns_prefix: str = "kproxy-"
    tick: float = 0.5
    backoff_initial: float = 10.0
    backoff_cap: float = 300.0
    clock: Callable[[], float] = time.monotonic

    def new_backoff(self) -> CrashBackoff:
        return CrashBackoff(self.backoff_initial, self.backoff_cap)


class PodWorker:
    def __init__(self, pod: Obj, rt: PodRuntime, record: PodRecord | None = None) -> None:
        m = podspec.meta(pod)
        self.uid = str(m.get("uid") or "")
        self.pod = pod
        self.rt = rt
        self.key = podspec.pod_key(pod)
        self.record = record or PodRecord(
            uid=self.uid,
            namespace=str(m.get("namespace") or "default"),
            name=str(m.get("name") or ""),
            netns=f"{rt.netns_prefix}{self.uid}",
            host_if=host_if_name(self.uid),
        )
        self.containers = [
            Container(spec=c, pod_label=self.key, backoff=rt.new_backoff())
            for c in podspec.spec(pod).get("containers") or ()
            if isinstance(c, dict)
        ]
        self.sandbox_ready = False
        self.sandbox_message = ""
        self.terminated = False  # finished terminating: the worker has ended
        self._gone = False  # the API object no longer exists
        self._terminate_requested = False
        self._wake = asyncio.Event()
        self._last_written = ""
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- control

    @property
    def pod_ip(self) -> str:
        return self.record.ip.split("/")[0] if self.record.ip else ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod:{self.key}")

    def add_done_callback(self, fn: Callable[[asyncio.Task[None]], object]) -> None:
        if self._task is not None:
            self._task.add_done_callback(fn)

    def update(self, pod: Obj) -> None:
        self.pod = pod
        self._wake.set()

    def api_deleted(self) -> None:
        """The API object is gone (force delete): terminate without writing to the API."""
        self._gone = True
        self._terminate_requested = True
        self._wake.set()

    def terminate(self) -> None:
        """Terminate the pod (e.g. it was not for this node after all)."""
        self._terminate_requested = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop the worker only: processes and netns stay, for the next kubelet to adopt."""
        task, self._task = self._task, None
        for t in [*self._probe_tasks, *([task] if task else [])]:
            t.cancel()
        await asyncio.gather(*self._probe_tasks, *([task] if task else []), return_exceptions=True)

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        try:
            self._adopt()
            for _ in range(10**9):  # bounded only nominally: ends on termination or cancel
                if self._terminate_requested or podspec.is_terminating(self.pod):
                    break
                now = self.rt.clock()
                if not self.sandbox_ready:
                    await self._setup_sandbox()
                if self.sandbox_ready:
                    self._sync_containers(now)
                    self._start_probes(now)
                await self._write_status()
                await self._sleep(self.rt.tick if self.sandbox_ready else 2.0)
            await self._terminate()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s: worker crashed", self.key)
            raise

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _adopt(self) -> None:
        now = self.rt.clock()
        for c in self.containers:
            rec = self.record.containers.get(c.name)
            if rec is None:
                continue
            proc = Process.adopt(rec.pid, rec.ticks)
            if proc is not None:
                c.adopted(proc, rec.restart_count, now, rec.started_at)
                log.info("pod %s: adopted container %s (pid %d)", self.key, c.name, rec.pid)
            else:
                # It died while no kubelet watched: an exit of unknown status.
                c.ever_started = True
                c.restart_count = rec.restart_count
                c.started_at, c.started_wall = now, rec.started_at
                c.process = Process(rec.pid, rec.ticks, None)
                c.process.exit_code = 255
                self._reap(c, now)

    async def _setup_sandbox(self) -> None:
        rec = self.record
        try:
            if not rec.ip:
                rec.ip = str(self.rt.ipam.allocate(self.uid))
            self.rt.state.save(rec)  # before the netns exists: it must never be orphaned
            address = IPv4Interface(rec.ip)
            await asyncio.to_thread(
                self.rt.podnet.setup_pod, rec.netns, rec.host_if, address, self.rt.ipam.gateway.ip
            )
        except (PodNetError, IpamError, OSError) as exc:
            self.sandbox_message = f"failed to set up the pod network: {exc}"
            log.error("pod %s: %s", self.key, self.sandbox_message)
            return
        if not rec.start_time:
            rec.start_time = now_rfc3339()
            self.rt.state.save(rec)
        self.sandbox_ready, self.sandbox_message = True, ""

    # ------------------------------------------------------------- containers

    def _policy(self) -> str:
        return str(podspec.spec(self.pod).get("restartPolicy") or "Always")

    def _reap(self, c: Container, now: float) -> None:
        if c.process is None:
            return
        code = c.process.poll()
        if code is None:
            return
        log.info("pod %s: container %s exited with %d", self.key, c.name, code)
        c.on_exit(code, self._policy(), now, now_rfc3339())

    def _sync_containers(self, now: float) -> None:
        grace = podspec.grace_period(self.pod, deleting=False)
        for c in self.containers:
            self._reap(c, now)
            if c.running and c.stop_requested:
                self._escalate(c, now)
            elif c.running and c.liveness_failed():
                log.info("pod %s: container %s failed liveness; restarting", self.key, c.name)
                c.request_stop(now, grace, "liveness")
                assert c.process is not None
                c.process.signal(signal.SIGTERM)
            elif c.should_start(now):
                self._start_container(c, now)

    def _escalate(self, c: Container, now: float) -> None:
        if c.process is not None and c.kill_deadline is not None and now >= c.kill_deadline:
            c.process.kill()

    def _start_container(self, c: Container, now: float) -> None:
        try:
            image = resolve(c.image)
            env = podspec.container_env(
                self.pod, c.spec, pod_ip=self.pod_ip, host_ip=self.rt.host_ip
            )
            command = [podspec.expand(str(x), env) for x in c.spec.get("command") or ()]
            args = [podspec.expand(str(x), env) for x in c.spec.get("args") or ()]
            argv = container_argv(image, command, args)
        except ImageError as exc:
            c.image_failed(exc.reason, str(exc), now)
            return
        except podspec.PodSpecError as exc:
            c.image_failed("CreateContainerConfigError", str(exc), now)
            return
        restart = c.restart_count + (1 if c.ever_started else 0)
        log_path = self.rt.state.log_path(self.uid, c.name, restart)
        try:
            proc = Process.spawn(
                netns_argv(self.record.netns, argv),
                env=env,
                cwd=str(c.spec.get("workingDir") or "/"),
                log_path=log_path,
            )
        except OSError as exc:
            c.image_failed("RunContainerError", f"cannot start {argv[0]}: {exc}", now)
            return
        c.on_started(proc, now, now_rfc3339())
        self.record.containers[c.name] = ContainerRecord(
            pid=proc.pid, ticks=proc.ticks, restart_count=c.restart_count, started_at=c.started_wall
        )
        self.rt.state.save(self.record)
        log.info("pod %s: started container %s (pid %d)", self.key, c.name, proc.pid)

    # ----------------------------------------------------------------- probes

    def _start_probes(self, now: float) -> None:
        for c in self.containers:
            for tracker in c.due_probes(now):
                tracker.begin(now)
                task = asyncio.create_task(self._probe(c, tracker))
                self._probe_tasks.add(task)
                task.add_done_callback(self._probe_tasks.discard)

    async def _probe(self, c: Container, tracker: ProbeTracker) -> None:
        netns = self.record.netns
        target = ProbeTarget(
            pod_ip=self.pod_ip,
            ports=podspec.named_ports(c.spec),
            exec_argv=lambda cmd: netns_argv(netns, cmd),
        )
        ok, why = await run_handler(tracker.spec, target)
        if tracker is not c.probes.get(tracker.spec.probe_type):
            return  # the container restarted meanwhile: this result is stale
        if tracker.observe(ok):
            log.info(
                "pod %s: %s probe of %s now %s%s", self.key, tracker.spec.probe_type, c.name,
                "success" if tracker.result else "failure", f" ({why})" if why else "",
            )  # fmt: skip
        self._wake.set()

    # ----------------------------------------------------------------- status

    def status(self) -> Obj:
        return pod_status(
            self.pod,
            statuses=[c.status() for c in self.containers],
            sandbox_ready=self.sandbox_ready,
            pod_ip=self.pod_ip or None,
            host_ip=self.rt.host_ip or None,
            start_time=self.record.start_time or None,
            now=now_rfc3339(),
        )

    async def _write_status(self, status: Obj | None = None) -> None:
        if self.rt.client is None or self._gone:
            return
        status = status if status is not None else self.status()
        text = json.dumps(status, sort_keys=True)
        if text == self._last_written:
            return
        m = podspec.meta(self.pod)
        try:
            updated = await self.rt.client.patch(
                PODS, str(m.get("name")), {"status": status}, str(m.get("namespace") or "default"),
                subresource="status",
            )  # fmt: skip
        except NotFound:
            self._gone = True
            return
        except ClientError as exc:
            log.warning("pod %s: status update failed: %s", self.key, exc)
            return
        self._last_written = text
        # Keep our copy's status current, so lastTransitionTime carries over.
        if isinstance(updated, dict) and updated.get("status"):
            self.pod = {**self.pod, "status": updated["status"]}

    # ------------------------------------------------------------ termination

    async def _terminate(self) -> None:
        deleting = podspec.is_terminating(self.pod) and not self._gone
        grace = podspec.grace_period(self.pod, deleting=deleting)
        now = self.rt.clock()
        for c in self.containers:
            c.request_stop(now, grace, "terminate")
            if c.running and c.process is not None:
                c.process.signal(signal.SIGTERM)
        deadline = now + grace + 10.0
        while any(c.running for c in self.containers) and self.rt.clock() < deadline:
            now = self.rt.clock()
            for c in self.containers:
                self._reap(c, now)
                if c.running:
                    self._escalate(c, now)
            await asyncio.sleep(0.05)
        for c in self.containers:
            if c.running and c.process is not None:
                log.error("pod %s: container %s survived SIGKILL", self.key, c.name)
        for t in list(self._probe_tasks):
            t.cancel()
        await self._teardown_sandbox()
        self.rt.state.remove(self.uid)
        self.terminated = True
        if deleting and self.rt.client is not None and not self._gone:
            final = self.status()
            codes = [int((s["state"].get("terminated") or {}).get("exitCode") or 0)
                     for s in final["containerStatuses"]]  # fmt: skip
            final["phase"] = "Failed" if any(codes) else "Succeeded"
            await self._write_status(final)
            m = podspec.meta(self.pod)
            try:
                await self.rt.client.delete(
                    PODS, str(m.get("name")), str(m.get("namespace") or "default"),
                    grace_period_seconds=0, preconditions={"uid": self.uid},
                )  # fmt: skip
            except NotFound:
                pass
            except ClientError as exc:
                log.warning("pod %s: final delete failed: %s", self.key, exc)
        log.info("pod %s: terminated", self.key)

    async def _teardown_sandbox(self) -> None:
        rec = self.record
        try:
            await asyncio.to_thread(self.rt.podnet.teardown_pod, rec.netns, rec.host_if)
        except PodNetError as exc:
            log.error("pod %s: network teardown failed: %s", self.key, exc)
        if not netns_exists(rec.netns):
            self.rt.ipam.release(self.uid)
        self.sandbox_ready = False
