"""Host-local style IPAM: files per address, idempotent per owner, round robin, release."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from kproxy.kubelet.ipam import Ipam, IpamError


def test_first_allocation_skips_network_and_gateway(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, IPv4Network("10.250.0.0/24"))
    assert ipam.gateway == IPv4Interface("10.250.0.1/24")
    assert ipam.allocate("pod-a") == IPv4Interface("10.250.0.2/24")
    assert (tmp_path / "10.250.0.2").read_text() == "pod-a"


def test_allocate_is_idempotent_per_owner(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, IPv4Network("10.250.0.0/24"))
    first = ipam.allocate("pod-a")
    assert ipam.allocate("pod-a") == first
    assert ipam.allocate("pod-b") != first
    assert ipam.owned_by("pod-b") is not None


def test_round_robin_does_not_reuse_a_freed_address_at_once(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, IPv4Network("10.250.0.0/24"))
    a = ipam.allocate("a")
    ipam.allocate("b")
    assert ipam.release("a") == [a.ip]
    assert ipam.allocate("c").ip == IPv4Address("10.250.0.4")


def test_exhaustion_and_wrap(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path, IPv4Network("10.250.0.0/29"))  # hosts .2-.6 usable
    got = [ipam.allocate(f"p{i}").ip for i in range(5)]
    assert got == [IPv4Address(f"10.250.0.{i}") for i in range(2, 7)]
    with pytest.raises(IpamError):
        ipam.allocate("one-too-many")
    ipam.release("p1")
    assert ipam.allocate("late").ip == IPv4Address("10.250.0.3")


def test_state_survives_a_new_instance(tmp_path: Path) -> None:
    Ipam(tmp_path, IPv4Network("10.250.0.0/24")).allocate("pod-a")
    again = Ipam(tmp_path, IPv4Network("10.250.0.0/24"))
    assert again.allocations() == {IPv4Address("10.250.0.2"): "pod-a"}
    assert again.allocate("pod-b").ip == IPv4Address("10.250.0.3")


def test_too_small_cidr_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IpamError):
        Ipam(tmp_path, IPv4Network("10.250.0.0/31"))
