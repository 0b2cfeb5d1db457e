"""Host-local style IPAM: one file per allocated pod IP under a directory, under a lock.

Owns which addresses of the node's podCIDR are taken and by whom. Layout (as CNI's
``host-local`` plugin, ``/var/lib/cni/networks/<net>/``):

- ``<dir>/<ip>`` — the address is allocated; the file holds the owner (the pod uid);
- ``<dir>/last_reserved_ip.0`` — where the round-robin search resumes;
- ``<dir>/lock`` — an ``flock`` serialising every change (several kubelets may share a
  root dir in tests, and a crash must never leave an address half-taken).

Invariants: the network and broadcast addresses and the gateway (the first host, the
bridge's address) are never handed out; an owner holds at most one address
(:meth:`Ipam.allocate` is idempotent, so a kubelet retrying a half-done setup gets the
same address back); a file is created with ``O_EXCL``, so two allocators cannot both
win an address; addresses are reused only after every other free one was tried.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path

from kproxy.errors import KProxyError

LAST_RESERVED = "last_reserved_ip.0"
LOCK = "lock"


class IpamError(KProxyError):
    """No address left, or the IPAM directory cannot be used."""


class Ipam:
    """Allocations of one podCIDR, persisted under ``directory``."""

    def __init__(self, directory: Path, cidr: IPv4Network) -> None:
        if cidr.num_addresses < 4:
            raise IpamError(f"pod CIDR {cidr} is too small for a gateway and a pod")
        self.directory = directory
        self.cidr = cidr
        self.gateway = IPv4Interface(f"{cidr.network_address + 1}/{cidr.prefixlen}")
        directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _first(self) -> int:
        return int(self.cidr.network_address) + 2

    def _last(self) -> int:
        return int(self.cidr.broadcast_address) - 1

    def allocations(self) -> dict[IPv4Address, str]:
        """Every allocated address and its owner."""
        out: dict[IPv4Address, str] = {}
        for entry in self.directory.iterdir():
            try:
                addr = ip_address(entry.name)
            except ValueError:
                continue
            if isinstance(addr, IPv4Address) and addr in self.cidr:
                with contextlib.suppress(OSError):
                    out[addr] = entry.read_text().strip()
        return out

    def owned_by(self, owner: str) -> IPv4Interface | None:
        for addr, who in self.allocations().items():
            if who == owner:
                return IPv4Interface(f"{addr}/{self.cidr.prefixlen}")
        return None

    def allocate(self, owner: str) -> IPv4Interface:
        """An address for ``owner`` (the one it already holds, if any)."""
        with self._locked():
            held = self.owned_by(owner)
            if held is not None:
                return held
            first, last = self._first(), self._last()
            start = first
            with contextlib.suppress(OSError, ValueError):
                prev = int(IPv4Address((self.directory / LAST_RESERVED).read_text().strip()))
                if first <= prev <= last:
                    start = prev + 1 if prev < last else first
            size = last - first + 1
            for i in range(size):
                candidate = IPv4Address(first + (start - first + i) % size)
                try:
                    fd = os.open(
                        self.directory / str(candidate), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
                    )
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(owner)
                (self.directory / LAST_RESERVED).write_text(str(candidate))
                return IPv4Interface(f"{candidate}/{self.cidr.prefixlen}")
        raise IpamError(f"no free address left in {self.cidr} for {owner}")

    def release(self, owner: str) -> list[IPv4Address]:
        """Free every address ``owner`` holds; the addresses freed."""
        freed: list[IPv4Address] = []
        with self._locked():
            for addr, who in self.allocations().items():
                if who == owner:
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / str(addr)).unlink()
                    freed.append(addr)
        return sorted(freed)
