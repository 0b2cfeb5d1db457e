"""``kproxy cluster up`` as a user runs it: up, reachable with the printed kubeconfig
from the printed hub namespace, and gone (namespaces and processes) after SIGTERM.

The command names its namespaces ``<--name>-<its pid>-…``; ``--name kpt-<our pid>-cli``
puts them under this session's prefix, which the session guard checks is gone too.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kproxy.client.rest import NODES
from kproxy.kernel.podnet import list_netns
from kproxy.localcluster import ApiThread
from tests.support.tiers import require_commands, require_root

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

KPROXY = str(Path(sys.executable).with_name("kproxy"))


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The command's output up to the end of the line holding ``marker`` (bounded).

    Reads the pipe's fd directly: a buffered ``readline`` after ``select`` misses
    lines that arrived in the same chunk (they sit in Python's buffer while the fd
    reads as empty), which made this wait out its timeout under load.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # exited
        data += chunk
        text = data.decode(errors="replace")
        at = text.find(marker)
        if at >= 0 and "\n" in text[at:]:
            return text
    raise AssertionError(f"no {marker!r} from kproxy cluster up:\n{data.decode(errors='replace')}")


def test_cluster_up_is_reachable_and_sigterm_removes_everything(tmp_path: Path) -> None:
    require_root()
    require_commands("ip", "nsenter", "iptables-nft-save")
    name = f"kpt-{os.getpid()}-cli"
    proc = subprocess.Popen(
        [KPROXY, "cluster", "up", "--nodes", "1", "--name", name, "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    prefix = f"{name}-{proc.pid}-"
    try:
        out = _read_until(proc, "cluster down", 90)
        hub = re.search(r"netns (\S+-hub):", out)
        kubeconfig = re.search(r"admin kubeconfig: (\S+)", out)
        assert hub and kubeconfig, out
        assert hub.group(1) == f"{prefix}hub"
        assert set(list_netns(prefix)) == {f"{prefix}hub", f"{prefix}node-1"}
        api = ApiThread(hub.group(1), Path(kubeconfig.group(1)))
        try:
            nodes = api.list(NODES, None)
        finally:
            api.close()
        assert [n["metadata"]["name"] for n in nodes] == ["node-1"]

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + rest
        assert "every namespace and process it made removed" in rest, rest
        assert list_netns(prefix) == []
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if list_netns(prefix):  # what a killed `up` left: the command's own cleanup
            subprocess.run([KPROXY, "cluster", "down", prefix], check=False, timeout=60)
