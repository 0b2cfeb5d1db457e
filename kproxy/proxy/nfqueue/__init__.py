"""The userspace mode's NFQUEUE data path (``--userspace-datapath nfqueue``).

``rules`` renders the mangle/nat rules (pure), ``handler`` chooses an endpoint
for the first packet of each flow and serves the queues, ``mode`` is the thin
applier implementing :class:`kproxy.proxy.mode.Mode`. The kernel forwards every
packet; userspace only marks the first one. This package never imports the
other proxy modes.
"""

from kproxy.proxy.nfqueue.mode import (
    NfqueueMode,
    NfqueueOptions,
    cleanup_rules,
    nfqueue_options,
)

__all__ = ["NfqueueMode", "NfqueueOptions", "cleanup_rules", "nfqueue_options"]
