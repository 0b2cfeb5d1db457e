"""The userspace proxy mode: portal rules steer service traffic to proxy sockets.

``portals`` renders the rules (pure), ``loadbalancer`` picks endpoints,
``proxysocket``/``udp``/``relay`` carry the bytes, ``mode`` is the thin applier
implementing :class:`kproxy.proxy.mode.Mode`. This package never imports the
other proxy modes.
"""

from kproxy.proxy.userspace.mode import UserspaceMode, UserspaceOptions, cleanup_rules

__all__ = ["UserspaceMode", "UserspaceOptions", "cleanup_rules"]
