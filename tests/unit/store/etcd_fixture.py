"""Real etcd members on loopback ports for the etcd tier.

Starts Debian's ``/usr/bin/etcd`` (3.4) with a throwaway data dir, only on
127.0.0.1, waits for ``/health``, and always kills every member it started (by pid),
even when startup or the test fails. One member serves the contract suite; the
same helper starts three for failover tests.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.tiers import require_commands

HEALTH_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """Kill this member (SIGTERM, then SIGKILL) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class EtcdCluster:
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member's client listener."""
        return [m.client_url.removeprefix("http://") for m in self.members]

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                text = m.log_path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {m.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


@contextlib.contextmanager
def etcd_cluster(base_dir: Path, size: int = 1) -> Iterator[EtcdCluster]:
    """Start ``size`` etcd members on free loopback ports; kill them all on exit."""
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    cluster = EtcdCluster()
    for i in range(size):
        port_c, port_p = _free_port(), _free_port()
        cluster.members.append(
            EtcdMember(
                name=f"kp{i}",
                client_url=f"http://127.0.0.1:{port_c}",
                peer_url=f"http://127.0.0.1:{port_p}",
                data_dir=base_dir / f"kp{i}.etcd",
                log_path=base_dir / f"kp{i}.log",
            )
        )
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    try:
        for m in cluster.members:
            argv = [
                etcd,
                f"--name={m.name}",
                f"--data-dir={m.data_dir}",
                f"--listen-client-urls={m.client_url}",
                f"--advertise-client-urls={m.client_url}",
                f"--listen-peer-urls={m.peer_url}",
                f"--initial-advertise-peer-urls={m.peer_url}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                "--initial-cluster-token=kproxy-test",
                # Bookmarks while idle, quickly enough for a test to see them.
                "--experimental-watch-progress-notify-interval=1s",
            ]
            with m.log_path.open("wb") as log:
                m.proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while not all(m.healthy() for m in cluster.members):
            dead = [m.name for m in cluster.members if m.proc is None or m.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd did not become healthy (dead: {dead})\n{cluster.log_tail()}"
                )
            time.sleep(0.1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by the session's etcd-tier tests."""
    require_commands("etcd")
    with etcd_cluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster
