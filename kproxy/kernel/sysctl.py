"""Reading and writing sysctls (``/proc/sys``) of the current or a named netns.

Writes go only where the caller runs: kproxy runs inside its node's network
namespace, and tests never call :func:`write` from the root namespace.
``ensure`` writes only when the value differs, as upstream's EnsureSysctl.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kproxy.errors import KProxyError

PROC_SYS = Path("/proc/sys")


class SysctlError(KProxyError):
    """A sysctl that could not be read or written."""


def _path(name: str) -> Path:
    rel = name.replace(".", "/") if "/" not in name else name
    return PROC_SYS / rel


def read(name: str, netns: str | None = None) -> str | None:
    """The value of ``name`` (``net/ipv4/ip_forward`` or dotted), None if absent."""
    if netns is not None:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, "cat", str(_path(name))],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.stdout.strip() if proc.returncode == 0 else None
    try:
        return _path(name).read_text().strip()
    except OSError:
        return None


def write(name: str, value: str, netns: str | None = None) -> None:
    if netns is not None:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name.replace('/', '.')}={value}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SysctlError(f"sysctl {name}={value} in {netns}: {proc.stderr.strip()}")
        return
    try:
        _path(name).write_text(value)
    except OSError as exc:
        raise SysctlError(f"sysctl {name}={value}: {exc}") from exc


def ensure(name: str, value: str, netns: str | None = None) -> bool:
    """Set ``name`` to ``value`` unless it already is; True when it was written."""
    if read(name, netns) == value:
        return False
    write(name, value, netns)
    return True
