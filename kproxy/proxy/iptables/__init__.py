"""The iptables proxy mode.

Owns the pure renderer (:mod:`~kproxy.proxy.iptables.chains` for names, fixed rules
and options; :mod:`~kproxy.proxy.iptables.render` for the per-service rules) that
turns a snapshot into the ``iptables-restore`` input upstream kube-proxy writes.
The thin applier that hands it to the kernel lives beside it and is the only
part of this package that does I/O (through ``kproxy.kernel``).
"""

from kproxy.proxy.iptables.chains import LocalDetector, RenderOptions
from kproxy.proxy.iptables.render import IPTablesRenderer, RenderResult
from kproxy.proxy.masquerade import masquerade_mark

__all__ = ["IPTablesRenderer", "LocalDetector", "RenderOptions", "RenderResult", "masquerade_mark"]
