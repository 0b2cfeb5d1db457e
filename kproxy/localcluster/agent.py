"""Requests from inside a namespace: :class:`Agent`, and :class:`Reply`, one answer.

An agent is a small Python process started inside a node's, a pod's or the hub's
network namespace; it reads one JSON request per line (``count`` GETs of one URL)
and writes one JSON line of results, so a batch of requests costs one round trip
instead of one process start each. The caller's own thread never joins a namespace.

Invariants: every request has a socket timeout, a batch stops after ``max_failures``
failures, and the caller waits for an answer at most ``count × (timeout + 0.5) + 5`` s;
an agent that missed that deadline is closed (a late answer would be read as the next
request's). Agents only ever send to the address they are given: the caller passes
addresses that live inside its own namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Final

from kproxy.kernel.clusternet import in_ns
from kproxy.localcluster.errors import ClusterError

__all__ = ["ECHO_PORT", "Agent", "Reply"]

ECHO_PORT: Final = 8080  # the port of the built-in echo image (kproxy/echo)

AGENT: Final = r"""
import json, socket, sys, time, urllib.error, urllib.request

def http(url, timeout):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return [r.status, r.read().decode(errors="replace"), time.monotonic() - t]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace"), time.monotonic() - t]
    except Exception as e:
        return [0, repr(e), time.monotonic() - t]

for line in sys.stdin:
    req = json.loads(line)
    out, failures = [], 0
    for _ in range(req["count"]):
        out.append(http(req["url"], req["timeout"]))
        failures += out[-1][0] != 200
        # A broken path should fail in seconds, not count x timeout.
        if failures >= req["max_failures"]:
            break
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP request's outcome (status 0: no HTTP answer; ``body`` then says why)."""

    status: int
    body: str
    elapsed: float

    @property
    def pod(self) -> str:
        """The answering echo pod's name (``"<pod> saw <ip>:<port>"``), else ``""``."""
        parts = self.body.split()
        return parts[0] if self.status == 200 and len(parts) == 3 and parts[1] == "saw" else ""


class Agent:
    """A long-lived request agent inside one namespace: one JSON line in, one out."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            in_ns(ns, [sys.executable, "-c", AGENT]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def get(
        self,
        ip: str,
        port: int,
        path: str = "/",
        *,
        count: int = 1,
        timeout: float = 2.0,
        max_failures: int = 3,
    ) -> list[Reply]:
        """``count`` GETs of ``http://ip:port/path`` (fewer once ``max_failures`` failed)."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None or self.proc.poll() is not None:
            raise ClusterError(f"agent in {self.ns} is not running")
        req = {
            "url": f"http://{ip}:{port}{path}",
            "count": count,
            "timeout": timeout,
            "max_failures": max_failures,
        }
        stdin.write(json.dumps(req) + "\n")
        stdin.flush()
        budget = count * (timeout + 0.5) + 5
        ready, _, _ = select.select([stdout], [], [], budget)
        if not ready:
            # A late answer would be read as the next request's: this agent is done.
            self.close()
            raise ClusterError(f"agent in {self.ns} gave no answer in {budget:.0f}s")
        line = stdout.readline()
        if not line:
            raise ClusterError(f"agent in {self.ns} died (exit {self.proc.poll()})")
        return [Reply(int(s), str(b), float(e)) for s, b, e in json.loads(line)]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
