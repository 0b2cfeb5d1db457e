"""The cluster tier's fixture: :mod:`kproxy.localcluster`, with skips for missing tools.

The cluster itself (namespaces, components, API thread, agents, teardown) is product
code in :mod:`kproxy.localcluster`; this module re-exports what the tests use and
adds the one test-specific rule: a machine that cannot run a local cluster (not
root, a tool missing) skips the tier locally and fails it under ``CI=true``
(:func:`tests.support.tiers.require`), instead of raising
:class:`~kproxy.localcluster.PrerequisiteMissing`.

Test namespaces use the prefix the caller passes (``kpt-<pid>-…``), which the
session guard in ``tests/conftest.py`` checks is gone at the end of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kproxy.localcluster import (
    CLUSTER_CIDR,
    ECHO_PORT,
    HUB_IP,
    Agent,
    ApiThread,
    Cluster,
    ClusterError,
    Node,
    PrerequisiteMissing,
    Proc,
    Reply,
    check_prerequisites,
    wait_for,
)
from kproxy.localcluster import running_cluster as _running_cluster
from tests.support.tiers import require

__all__ = [
    "CLUSTER_CIDR",
    "ECHO_PORT",
    "HUB_IP",
    "Agent",
    "ApiThread",
    "Cluster",
    "ClusterError",
    "Node",
    "Proc",
    "Reply",
    "running_cluster",
    "wait_for",
]


@contextlib.contextmanager
def running_cluster(workdir: Path, prefix: str, **options: Any) -> Iterator[Cluster]:
    """:func:`kproxy.localcluster.running_cluster` (same ``options``), skipped (failed
    under CI) where this machine cannot run it."""
    try:
        check_prerequisites(options.get("iptables_backend", "nft"))
    except PrerequisiteMissing as exc:
        require(False, str(exc))
    with _running_cluster(workdir, prefix, **options) as cluster:
        yield cluster
