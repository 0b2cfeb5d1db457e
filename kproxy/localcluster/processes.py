"""The local cluster's component processes: their command lines and :class:`Proc`.

Owns how each component is started — ``kproxy apiserver``, ``controller-manager``,
``scheduler``, ``kubelet`` and ``proxy``, each the real command a user would run,
started inside one namespace with ``nsenter`` — and the flags that make a local
cluster react quickly (short sync ticks, leases and grace periods).

Invariants:

- A component runs in a session of its own, so :meth:`Proc.stop` signals it and
  everything it spawned, and a Ctrl-C meant for the caller never reaches it
  (the kubelet's containers are in sessions of their own and outlive it, as pods do).
- Each component logs to ``<logdir>/<name>.log``, appended across restarts with a
  header per start; its working directory is ``logdir`` (never a checkout).
- :meth:`Proc.stop` is bounded: SIGTERM (or the signal asked for), SIGKILL after the
  timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kproxy.kernel.clusternet import (
    APISERVER_PORT,
    CLUSTER_CIDR,
    HEALTHZ_PORT,
    HUB_IP,
    METRICS_PORT,
    in_ns,
)
from kproxy.localcluster.errors import ComponentExited

__all__ = [
    "Proc",
    "apiserver_argv",
    "controller_manager_argv",
    "kproxy_argv",
    "kubelet_argv",
    "proxy_argv",
    "scheduler_argv",
]


def kproxy_argv() -> list[str]:
    """How to run this installation's ``kproxy`` command.

    The console script beside the interpreter (a venv's ``bin/``), else the one on
    ``PATH``, else this interpreter importing the CLI; components must run the same
    kproxy as the caller, never another one found first on ``PATH``.
    """
    beside = Path(sys.executable).with_name("kproxy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("kproxy")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from kproxy.cli import main; sys.exit(main())"]


def apiserver_argv(data_dir: Path) -> list[str]:
    return [
        *kproxy_argv(), "-v", "apiserver",
        "--storage-backend", "sqlite",
        "--data-dir", str(data_dir),
        "--bind-address", HUB_IP,
        "--secure-port", str(APISERVER_PORT),
        "--watch-bookmark-interval", "5s",
    ]  # fmt: skip


def controller_manager_argv(kubeconfig: Path, node_monitor_grace_period: str) -> list[str]:
    return [
        *kproxy_argv(), "-v", "controller-manager",
        "--kubeconfig", str(kubeconfig),
        "--cluster-cidr", CLUSTER_CIDR,
        "--node-monitor-grace-period", node_monitor_grace_period,
        "--node-monitor-period", "1s",
    ]  # fmt: skip


def scheduler_argv(kubeconfig: Path) -> list[str]:
    return [*kproxy_argv(), "-v", "scheduler", "--kubeconfig", str(kubeconfig)]


def kubelet_argv(
    name: str, ip: str, kubeconfig: Path, root_dir: Path, netns_prefix: str, labels: str
) -> list[str]:
    return [
        *kproxy_argv(), "-v", "kubelet",
        "--kubeconfig", str(kubeconfig),
        "--hostname-override", name,
        "--node-ip", ip,
        "--root-dir", str(root_dir),
        "--netns-prefix", netns_prefix,
        "--bridge", "kpbr0",
        "--address", ip,
        "--port", "10250",
        "--node-labels", labels,
        "--crash-backoff-initial", "0.5",
        "--crash-backoff-max", "2",
        "--sync-tick", "0.1",
        "--node-status-update-frequency", "1",
        "--node-lease-duration-seconds", "4",
    ]  # fmt: skip


def proxy_argv(name: str, ip: str, kubeconfig: Path, mode: str, iptables_backend: str) -> list[str]:
    return [
        *kproxy_argv(), "-v", "proxy",
        "--kubeconfig", str(kubeconfig),
        "--proxy-mode", mode,
        "--hostname-override", name,
        "--node-ip", ip,
        "--cluster-cidr", CLUSTER_CIDR,
        "--iptables-backend", iptables_backend,
        "--iptables-min-sync-period", "0.1s",
        "--iptables-sync-period", "5s",
        "--healthz-bind-address", f"{ip}:{HEALTHZ_PORT}",
        "--metrics-bind-address", f"{ip}:{METRICS_PORT}",
    ]  # fmt: skip


@dataclass
class Proc:
    """One component: ``argv`` inside namespace ``ns``, restartable, logging to a file."""

    name: str
    ns: str
    argv: list[str]
    logdir: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}.log"

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                in_ns(self.ns, self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(self.logdir),
            )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`ComponentExited` (with the log's tail) if it has exited."""
        if not self.alive:
            status = None if self.popen is None else self.popen.returncode
            raise ComponentExited(f"{self.name} exited (status {status}):\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process group, SIGKILL it after ``timeout``; the exit status."""
        proc, self.popen = self.popen, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return f"<no log for {self.name}>"
