"""Built-in "images": small programs the kubelet runs as containers (``python -m``).

Each module is standalone (stdlib only, no kproxy imports), so a container process
never loads the control plane. The kubelet maps image names to these modules:

- ``kproxy/echo`` (:mod:`.echo`): HTTP echo answering ``<pod> saw <ip>:<port>``, probe
  endpoints whose answers tests can flip, and a TCP line echo;
- ``kproxy/udp-echo`` (:mod:`.udp_echo`): UDP datagrams answered ``<pod> saw <ip>:<port>``;
- ``kproxy/sleep`` (:mod:`.sleep`): sleeps (forever by default), exits 0 on SIGTERM.

``kproxy/shell`` and ``busybox`` are not modules: they run the host's ``/bin/sh``.
"""

import os
import socket


def pod_name() -> str:
    """Who this pod is: ``POD_NAME``, else ``HOSTNAME`` (the kubelet sets it), else the host."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
