"""Container probes: their settings, the result state machine, and running the handlers.

Owns :class:`ProbeSpec` (a ``Probe`` object with upstream's defaults), :class:`ProbeTracker`
(a pure state machine driven by the caller's clock) and :func:`run_handler` (one
``httpGet``, ``tcpSocket`` or ``exec`` attempt, bounded by ``timeoutSeconds``).

The state machine, as upstream's prober workers:

- the first probe is due ``initialDelaySeconds`` after the container started, then every
  ``periodSeconds``;
- the result flips to failure after ``failureThreshold`` consecutive failures and back
  to success after ``successThreshold`` consecutive successes;
- before any probe has decided: readiness and startup are *failure*, liveness *success*;
- ``successThreshold`` is forced to 1 for liveness and startup (the API demands it);
- a startup probe, once it succeeded, is never run again for that container instance;
  holding liveness and readiness off until then is the caller's job (it knows them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ProbeType = Literal["liveness", "readiness", "startup"]
HandlerKind = Literal["httpGet", "tcpSocket", "exec", "grpc"]
HANDLER_KINDS: tuple[HandlerKind, ...] = ("httpGet", "tcpSocket", "exec", "grpc")


def _num(value: Any, default: float, minimum: float) -> float:
    try:
        n = float(value) if value is not None else default
    except (TypeError, ValueError):
        n = default
    return max(n, minimum)


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    probe_type: ProbeType
    kind: HandlerKind
    handler: Mapping[str, Any]
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def parse(cls, probe_type: ProbeType, probe: Mapping[str, Any]) -> ProbeSpec | None:
        """The spec of a pod's ``livenessProbe`` etc.; None when it names no handler."""
        kind = next((k for k in HANDLER_KINDS if isinstance(probe.get(k), Mapping)), None)
        if kind is None:
            return None
        success = int(_num(probe.get("successThreshold"), 1, 1))
        if probe_type != "readiness":
            success = 1
        return cls(
            probe_type=probe_type,
            kind=kind,
            handler=probe[kind],
            initial_delay=_num(probe.get("initialDelaySeconds"), 0, 0),
            period=_num(probe.get("periodSeconds"), 10, 1),
            timeout=_num(probe.get("timeoutSeconds"), 1, 1),
            success_threshold=success,
            failure_threshold=int(_num(probe.get("failureThreshold"), 3, 1)),
        )


@dataclass
class ProbeTracker:
    """One probe of one container instance (a restarted container gets a new tracker)."""

    spec: ProbeSpec
    started_at: float  # the container instance's start, on the caller's clock
    result: bool = field(init=False)
    decided: bool = False  # whether any threshold was reached yet
    successes: int = 0
    failures: int = 0
    last_run: float | None = None
    in_flight: bool = False
    done: bool = False  # a startup probe that succeeded is not run again

    def __post_init__(self) -> None:
        self.result = self.spec.probe_type == "liveness"

    def due(self, now: float) -> bool:
        if self.in_flight or self.done:
            return False
        if self.last_run is None:
            return now >= self.started_at + self.spec.initial_delay
        return now >= self.last_run + self.spec.period

    def next_due(self) -> float:
        if self.last_run is None:
            return self.started_at + self.spec.initial_delay
        return self.last_run + self.spec.period

    def begin(self, now: float) -> None:
        self.last_run = now
        self.in_flight = True

    def observe(self, ok: bool) -> bool:
        """Record one attempt's outcome; True when :attr:`result` changed."""
        self.in_flight = False
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        before = self.result
        if ok and self.successes >= self.spec.success_threshold:
            self.result, self.decided = True, True
            if self.spec.probe_type == "startup":
                self.done = True
        elif not ok and self.failures >= self.spec.failure_threshold:
            self.result, self.decided = False, True
        return self.result != before


# ------------------------------------------------------------------ handlers


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where a container's probes go: its pod IP, its named ports, its netns argv."""

    pod_ip: str
    ports: Mapping[str, int]
    exec_argv: Any  # Callable[[Sequence[str]], list[str]]: the command inside the pod netns


def resolve_port(value: Any, ports: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    if text in ports:
        return ports[text]
    raise ValueError(f"unknown named port {text!r}")


async def run_handler(spec: ProbeSpec, target: ProbeTarget) -> tuple[bool, str]:
    """One attempt: (success, a short reason for failures)."""
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "httpGet":
                return await _http(spec.handler, target)
            if spec.kind == "tcpSocket":
                return await _tcp(spec.handler, target)
            if spec.kind == "exec":
                return await _exec(spec.handler, target)
            return False, f"{spec.kind} probes are not supported"
    except TimeoutError:
        return False, f"timeout after {spec.timeout:g}s"
    except (OSError, ValueError) as exc:
        return False, str(exc) or type(exc).__name__


async def _http(handler: Mapping[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    host = str(handler.get("host") or target.pod_ip)
    port = resolve_port(handler.get("port"), target.ports)
    path = str(handler.get("path") or "/")
    tls: ssl.SSLContext | None = None
    if str(handler.get("scheme") or "HTTP").upper() == "HTTPS":
        # Upstream's prober skips verification too: a probe checks liveness, not identity.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        headers = {"Host": f"{host}:{port}", "User-Agent": "kube-probe/1.32", "Accept": "*/*"}
        for h in handler.get("httpHeaders") or ():
            if isinstance(h, Mapping) and h.get("name"):
                headers[str(h["name"])] = str(h.get("value") or "")
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.decode(errors="replace").split()
    code = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    if 200 <= code < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {code}"


async def _tcp(handler: Mapping[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    host = str(handler.get("host") or target.pod_ip)
    port = resolve_port(handler.get("port"), target.ports)
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, ""


async def _exec(handler: Mapping[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    command: Sequence[str] = [str(c) for c in handler.get("command") or ()]
    if not command:
        return False, "exec probe without a command"
    proc = await asyncio.create_subprocess_exec(
        *target.exec_argv(command),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own group: a timeout kills what it spawned too
    )
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if proc.returncode == 0:
        return True, ""
    return False, f"exit {proc.returncode}: {out.decode(errors='replace').strip()[:200]}"
