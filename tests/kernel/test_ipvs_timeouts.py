"""IPVS connection timeouts (``--ipvs-tcp-timeout`` and friends): argv on the host,
the real ``IPVS_CMD_SET_CONFIG`` in the VM."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import pytest

from kproxy.kernel.ipvs import IpvsError, set_timeouts


def test_argv_and_errors_without_a_kernel() -> None:
    seen: list[list[str]] = []

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        seen.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, "", "")

    set_timeouts(900, 120, 300, run=run)
    assert seen == [["ipvsadm", "--set", "900", "120", "300"]]

    def failing(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 2, "", "Protocol not available")

    with pytest.raises(IpvsError, match="Protocol not available"):
        set_timeouts(1, 2, 3, run=failing)
    with pytest.raises(IpvsError):
        set_timeouts(-1, 0, 0, run=run)


@pytest.mark.vm
def test_timeouts_reach_the_kernel() -> None:
    assert os.environ.get("KPROXY_IN_VM") == "1", "real IPVS only inside the VM"
    set_timeouts(901, 121, 301)
    out = subprocess.run(
        ["ipvsadm", "-L", "--timeout"], capture_output=True, text=True, check=True
    ).stdout
    assert "901 121 301" in out, out
    set_timeouts(0, 0, 0)  # 0 keeps the current values
    out = subprocess.run(
        ["ipvsadm", "-L", "--timeout"], capture_output=True, text=True, check=True
    ).stdout
    assert "901 121 301" in out, out
