"""Container processes: start one inside a pod's netns, watch it, signal it, adopt it.

Owns :class:`Process`. A container is one process (plus whatever it forks) in its own
session and process group, so signals reach the whole container with ``killpg`` and
the kubelet's own terminal signals never do. Its stdout and stderr go to a log file
(append), never to a pipe: the process must outlive the kubelet that started it.

Identity is ``(pid, start time)`` (field 22 of ``/proc/<pid>/stat``): a pid alone may be
reused after the container died, and a kubelet adopting a pid after a restart must not
mistake a stranger for its container.

Exit status: a child of this kubelet is reaped (``waitpid``) and reports its real exit
code (a signal N as 128+N, as container runtimes do). An adopted process is not our
child, so its exit code is unknown: it is reported as :data:`UNKNOWN_EXIT`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

UNKNOWN_EXIT = 255


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class Process:
    """One running (or finished) container process."""

    def __init__(self, pid: int, ticks: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.ticks = ticks
        self._popen = popen
        self.exit_code: int | None = None

    @property
    def adopted(self) -> bool:
        return self._popen is None

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        log_path: Path,
    ) -> Process:
        """Start ``argv`` (already wrapped to enter the netns); raises OSError if it cannot."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        ticks = start_ticks(popen.pid)
        return cls(popen.pid, ticks if ticks is not None else -1, popen)

    @classmethod
    def adopt(cls, pid: int, ticks: int) -> Process | None:
        """The process ``pid`` if it still is the one that started at ``ticks``."""
        if pid <= 0 or start_ticks(pid) != ticks:
            return None
        return cls(pid, ticks, None)

    def poll(self) -> int | None:
        """None while running; the exit code once it has ended."""
        if self.exit_code is not None:
            return self.exit_code
        if self._popen is not None:
            rc = self._popen.poll()
            if rc is None:
                return None
            self.exit_code = 128 - rc if rc < 0 else rc
            return self.exit_code
        if start_ticks(self.pid) == self.ticks:
            return None
        self.exit_code = UNKNOWN_EXIT
        return self.exit_code

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the container's process group (and the process, if it left it)."""
        if self.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
