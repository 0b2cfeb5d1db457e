"""One container of a pod: its lifecycle state machine and its API status.

Owns :class:`Container`: whether it is waiting (and why), running (which
:class:`~.process.Process`, since when) or terminated (how), its restart count and
crash back-off, and its probe trackers. It decides; the pod worker (:mod:`.pod`) does
the I/O (spawning, signalling, probing) and feeds the outcomes back. Times are on the
caller's monotonic clock, plus a wall-clock string for the API.

Invariants:

- at most one process per container at any time: a new one is started only after the
  previous one was seen to exit;
- ``restartCount`` counts starts after the first, and survives a kubelet restart (it is
  persisted with the pid);
- ``started`` is True only while running with the startup probe passed (or absent);
  ``ready`` only while started and the readiness probe says so (or is absent); a
  startup probe holds liveness and readiness off;
- after an exit the container restarts per ``restartPolicy``, after the crash back-off
  (shown as waiting ``CrashLoopBackOff``); the exit is kept as ``lastState``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.kubelet.backoff import CrashBackoff
from kproxy.kubelet.images import ERR_IMAGE_PULL, IMAGE_PULL_BACKOFF
from kproxy.kubelet.probes import ProbeSpec, ProbeTracker, ProbeType
from kproxy.kubelet.process import Process

Obj = dict[str, Any]
PROBE_FIELDS: tuple[tuple[ProbeType, str], ...] = (
    ("startup", "startupProbe"),
    ("liveness", "livenessProbe"),
    ("readiness", "readinessProbe"),
)


def will_restart(policy: str, exit_code: int) -> bool:
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return exit_code != 0
    return True


@dataclass
class Container:
    spec: Mapping[str, Any]
    pod_label: str  # "namespace/name", for messages
    backoff: CrashBackoff = field(default_factory=CrashBackoff)
    restart_count: int = 0
    process: Process | None = None
    started_at: float = 0.0  # monotonic, of the current or last instance
    started_wall: str = ""
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    terminated: Obj | None = None  # the current state, when it will not restart
    last_state: Obj | None = None  # the previous instance's termination
    restart_at: float = 0.0  # no start before this (monotonic)
    ever_started: bool = False
    probes: dict[ProbeType, ProbeTracker] = field(default_factory=dict)
    stop_requested: bool = False  # being killed (liveness failure or pod termination)
    kill_deadline: float | None = None
    stop_purpose: str = ""  # "liveness" (restart per policy) | "terminate" (stay down)

    @property
    def name(self) -> str:
        return str(self.spec.get("name") or "")

    @property
    def image(self) -> str:
        return str(self.spec.get("image") or "")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.exit_code is None

    # ---------------------------------------------------------------- decisions

    def should_start(self, now: float) -> bool:
        return (
            self.process is None
            and self.terminated is None
            and not self.stop_requested
            and now >= self.restart_at
        )

    def image_failed(self, reason: str, message: str, now: float) -> None:
        """The image cannot be run: wait, retrying with the same back-off as crashes."""
        first = reason == ERR_IMAGE_PULL and self.waiting_reason not in (
            ERR_IMAGE_PULL,
            IMAGE_PULL_BACKOFF,
        )
        if reason == ERR_IMAGE_PULL and not first:
            reason = IMAGE_PULL_BACKOFF
            message = f'Back-off pulling image "{self.image}": {message}'
        self.waiting_reason, self.waiting_message = reason, message
        self.restart_at = now + self.backoff.delay(0.0)

    def on_started(self, process: Process, now: float, wall: str) -> None:
        if self.ever_started:
            self.restart_count += 1
        self.ever_started = True
        self.process = process
        self.started_at, self.started_wall = now, wall
        self.waiting_reason = self.waiting_message = ""
        self.stop_requested, self.kill_deadline, self.stop_purpose = False, None, ""
        self.probes = {}
        for ptype, fieldname in PROBE_FIELDS:
            raw = self.spec.get(fieldname)
            probe = ProbeSpec.parse(ptype, raw) if isinstance(raw, Mapping) else None
            if probe is not None:
                self.probes[ptype] = ProbeTracker(probe, now)

    def adopted(self, process: Process, restart_count: int, now: float, wall: str) -> None:
        """A process found running after a kubelet restart: running, probes start afresh."""
        self.on_started(process, now, wall)
        self.restart_count = restart_count

    def on_exit(self, code: int, policy: str, now: float, wall: str) -> None:
        reason = "Completed" if code == 0 else "Error"
        term: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": self.started_wall or None,
            "finishedAt": wall,
            "containerID": self._container_id(),
        }
        self.process = None
        self.probes = {}
        self.kill_deadline = None
        if self.stop_purpose == "terminate":
            self.terminated = term
            return
        self.last_state = term
        self.stop_purpose = ""
        self.stop_requested = False
        if will_restart(policy, code):
            delay = self.backoff.delay(now - self.started_at)
            self.restart_at = now + delay
            self.waiting_reason = "CrashLoopBackOff"
            self.waiting_message = (
                f"back-off {delay:g}s restarting failed container={self.name} pod={self.pod_label}"
            )
        else:
            self.terminated = term

    def request_stop(self, now: float, grace: float, purpose: str) -> None:
        """Begin killing the running instance (the worker sends the signals).

        ``purpose`` ``"terminate"`` (the pod is going away) keeps the container down; a
        ``"liveness"`` kill restarts it per ``restartPolicy``. A termination request
        overrides a liveness kill in progress, and never extends its deadline.
        """
        if self.stop_requested and not (purpose == "terminate" != self.stop_purpose):
            return
        deadline = now + grace
        if self.kill_deadline is not None:
            deadline = min(deadline, self.kill_deadline)
        self.stop_requested = True
        self.stop_purpose = purpose
        self.kill_deadline = deadline

    # ------------------------------------------------------------------- probes

    @property
    def started(self) -> bool:
        if not self.running:
            return False
        startup = self.probes.get("startup")
        return startup is None or startup.result

    @property
    def ready(self) -> bool:
        if not self.started or self.stop_requested:
            return False
        readiness = self.probes.get("readiness")
        return readiness is None or readiness.result

    def due_probes(self, now: float) -> list[ProbeTracker]:
        if not self.running or self.stop_requested:
            return []
        startup = self.probes.get("startup")
        if startup is not None and not startup.done:
            return [startup] if startup.due(now) else []
        return [
            t
            for ptype in ("liveness", "readiness")
            if (t := self.probes.get(ptype)) is not None and t.due(now)
        ]

    def liveness_failed(self) -> bool:
        live, startup = self.probes.get("liveness"), self.probes.get("startup")
        failed = live is not None and live.decided and not live.result
        # A startup probe that gives up kills the container just like liveness.
        return failed or (startup is not None and startup.decided and not startup.result)

    # ------------------------------------------------------------------- status

    def _container_id(self) -> str:
        return f"kproxy://{self.process.pid}" if self.process is not None else ""

    def status(self) -> Obj:
        state: Obj
        if self.running and self.process is not None:
            state = {"running": {"startedAt": self.started_wall}}
        elif self.terminated is not None:
            state = {"terminated": dict(self.terminated)}
        else:
            waiting: Obj = {"reason": self.waiting_reason or "ContainerCreating"}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            state = {"waiting": waiting}
        out: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": f"kproxy-builtin://{self.image}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": dict(self.last_state)} if self.last_state else {},
        }
        if self.process is not None:
            out["containerID"] = self._container_id()
        return out
