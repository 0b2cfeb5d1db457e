"""Suite-wide fixtures and the guard that keeps the host untouched.

The session guard snapshots the root network namespace's rules (legacy and
nft, IPv4 and IPv6) and this session's network namespaces, and fails the run
if a test left either changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.netns import *  # noqa: F403  (fixtures: netns factory)
from tests.support.vm import *  # noqa: F403  (hooks: run vm-marked tests inside the VM)


def _root_state() -> dict[str, str]:
    state: dict[str, str] = {}
    for tool in (
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ):
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
            # Counters and the timestamp comment change on their own; the rules must not.
            state[tool] = "\n".join(
                line.split(" [", 1)[0] if line.startswith(":") else line
                for line in out.splitlines()
                if not line.startswith("#")
            )
    if shutil.which("ip"):
        listing = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        # Only this session's namespaces: other sessions on a shared machine
        # may create and remove their own while we run.
        ours = f"kpt-{os.getpid()}-"
        state["netns"] = "\n".join(line for line in listing.splitlines() if line.startswith(ours))
    return state


@pytest.fixture(scope="session", autouse=True)
def host_untouched() -> Iterator[None]:
    """Fail the session if the root namespace's rules or netns list changed."""
    before = _root_state()
    yield
    after = _root_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test run changed the host's root namespace: {changed}"
