"""Tier prerequisites: skip locally, fail under CI.

A tier whose prerequisites are missing (no root, no iptables, no qemu, ...)
is skipped on a developer's machine but fails when ``CI=true``, so that a CI
run can never pass by skipping the tests that matter.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(ok: bool, why: str) -> None:
    """Skip (locally) or fail (under CI=true) the current test unless ``ok``."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"tier prerequisite missing under CI: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (CAP_NET_ADMIN)")


def require_commands(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"missing commands: {', '.join(missing)}")


def optional_command(name: str) -> None:
    """Skip (even under CI) unless ``name`` is installed.

    For tools the project does not install itself and whose tests the issues
    ask for only "where installed" (kubectl is not in Debian's archive).
    """
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed on this machine")


def require_module(name: str) -> ModuleType:
    """Import ``name``; skip locally, fail under CI=true when it is not installed.

    The project's test extra installs every such module, so a missing one under
    CI is a broken set-up, not a reason to skip.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, f"python module {name} is not installed ({exc})")
        raise  # unreachable: require() skipped or failed
