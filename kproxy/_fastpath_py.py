"""Pure-Python twin of :mod:`kproxy._fastpath`.

This module is the reference: every function and class of the compiled module
exists here with the same signature and the same results, and the test suite
checks the two against each other.  It is also what kproxy runs when the
extension is missing or ``KPROXY_NO_EXTENSIONS=1`` is set.

Owns:
- upstream kube-proxy's chain-name hash: SHA-256 of the service-port name plus
  the lower-case protocol (plus ``"IP:port"`` for an endpoint), RFC 4648
  base32, first 16 characters (``portProtoHash`` / ``servicePortEndpointChainName``);
- round-robin endpoint selection with upstream's userspace semantics: the
  index resets when the endpoint list changes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

__all__ = ["RoundRobin", "endpoint_hash", "port_proto_hash"]


def _hash16(text: str) -> str:
    # 16 base32 characters carry exactly the first 80 bits (10 bytes) of the digest.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """Hash shared by a service port's KUBE-SVC/SVL/EXT/FW chains.

    ``service_port_name`` is ``"ns/name"`` or ``"ns/name:port"``; ``protocol`` is
    lower-case (``"tcp"``), appended with no separator, as upstream does.
    """
    return _hash16(service_port_name + protocol)


def endpoint_hash(service_port_name: str, protocol: str, endpoint: str) -> str:
    """Hash of a KUBE-SEP chain; ``endpoint`` is ``"IP:port"`` (``"[v6]:port"``)."""
    return _hash16(service_port_name + protocol + endpoint)


class RoundRobin:
    """Round-robin over an endpoint list.

    Invariant: ``0 <= index < len(endpoints)`` whenever there are endpoints.
    Setting a different list resets the index to 0 (upstream's userspace
    load balancer does the same); setting an equal list keeps the position so
    that a no-op update does not skew the rotation.
    """

    __slots__ = ("_endpoints", "_index")

    def __init__(self, endpoints: Sequence[str] = ()) -> None:
        self._endpoints: tuple[str, ...] = tuple(endpoints)
        self._index = 0

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def index(self) -> int:
        return self._index

    def __len__(self) -> int:
        return len(self._endpoints)

    def set_endpoints(self, endpoints: Sequence[str]) -> bool:
        """Replace the endpoints; returns True when the list changed."""
        new = tuple(endpoints)
        if new == self._endpoints:
            return False
        self._endpoints = new
        self._index = 0
        return True

    def next_index(self) -> int:
        """Index of the next endpoint; raises LookupError when there is none."""
        n = len(self._endpoints)
        if n == 0:
            raise LookupError("no endpoints")
        i = self._index
        self._index = i + 1 if i + 1 < n else 0
        return i

    def next(self) -> str:
        """The next endpoint; raises LookupError when there is none."""
        return self._endpoints[self.next_index()]
