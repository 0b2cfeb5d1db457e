"""The local cluster's errors, all under :class:`~kproxy.errors.KProxyError`.

Callers tell apart what the machine lacks (:class:`PrerequisiteMissing`: a test
wrapper turns it into a skip) from a bring-up that went wrong (everything else).
"""

from __future__ import annotations

from kproxy.kernel.clusternet import ClusterNetError, PrerequisiteMissing

__all__ = ["ClusterError", "ComponentExited", "PrerequisiteMissing", "WaitTimeout"]

# The network's errors are the cluster's: one base class for every failure, and
# the machine's missing prerequisites found where the network is made.
ClusterError = ClusterNetError


class ComponentExited(ClusterError):
    """A component process exited while the cluster waited for it; carries its log tail."""


class WaitTimeout(ClusterError):
    """A bounded wait ran out; the message says for what, and the last thing seen."""
