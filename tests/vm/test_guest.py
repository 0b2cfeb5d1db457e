"""What the vm tier promises about the guest: our kernel, IPVS loaded, no network device.

Every test here is marked ``vm`` and so runs inside the one VM of the session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.vm import find_kernel

pytestmark = pytest.mark.vm


def test_runs_inside_the_vm_on_the_chosen_kernel() -> None:
    assert os.environ.get("KPROXY_IN_VM") == "1"
    assert os.geteuid() == 0
    kernel = find_kernel()
    assert kernel is not None
    assert os.uname().release == kernel[1]


def test_ipvs_is_loaded() -> None:
    assert Path("/proc/net/ip_vs").exists()
    modules = Path("/proc/modules").read_text()
    assert "ip_vs_rr " in modules
    assert "dummy " in modules


def test_guest_has_no_network_device() -> None:
    assert sorted(p.name for p in Path("/sys/class/net").iterdir()) == ["lo"]
