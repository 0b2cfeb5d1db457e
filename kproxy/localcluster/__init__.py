"""A whole kproxy cluster on one machine, in network namespaces (``kproxy cluster up``).

A hub namespace runs the control plane (``kproxy apiserver`` on SQLite,
``controller-manager``, ``scheduler``); each node namespace runs ``kproxy kubelet``
and ``kproxy proxy``; nodes route each other's podCIDRs ("host-gw"). The components
are the real commands, run as processes: this package drives them, it never imports
them (an import-linter contract keeps it so).

Modules, each owning one thing:

- :mod:`~kproxy.kernel.clusternet` — the namespaces, links, addresses and routes (in
  the kernel package, the only one that changes the host);
- :mod:`~kproxy.localcluster.processes` — the components' command lines and processes;
- :mod:`~kproxy.localcluster.api` — the REST client on a thread inside the hub;
- :mod:`~kproxy.localcluster.agent` — HTTP requests sent from inside a namespace;
- :mod:`~kproxy.localcluster.cluster` — bring-up order and teardown (:class:`Cluster`);
- :mod:`~kproxy.localcluster.command` — ``kproxy cluster up|down`` and signal handling;
- :mod:`~kproxy.localcluster.waits`, :mod:`~kproxy.localcluster.errors`.

Safety: nothing is created in or changed in the root network namespace; every
namespace has a unique prefix and is removed on any exit.
"""

from __future__ import annotations

from kproxy.kernel.clusternet import CLUSTER_CIDR, HUB_IP, SERVICE_CIDR, check_prerequisites
from kproxy.localcluster.agent import ECHO_PORT, Agent, Reply
from kproxy.localcluster.api import ApiThread, Watch
from kproxy.localcluster.cluster import Cluster, Node, running_cluster
from kproxy.localcluster.command import cluster_up
from kproxy.localcluster.errors import (
    ClusterError,
    ComponentExited,
    PrerequisiteMissing,
    WaitTimeout,
)
from kproxy.localcluster.processes import Proc
from kproxy.localcluster.waits import wait_for

__all__ = [
    "CLUSTER_CIDR",
    "ECHO_PORT",
    "HUB_IP",
    "SERVICE_CIDR",
    "Agent",
    "ApiThread",
    "Cluster",
    "ClusterError",
    "ComponentExited",
    "Node",
    "PrerequisiteMissing",
    "Proc",
    "Reply",
    "WaitTimeout",
    "Watch",
    "check_prerequisites",
    "cluster_up",
    "running_cluster",
    "wait_for",
]
