"""The Maglev load balancer of the userspace mode, on whichever fast path is loaded.

It must satisfy the same :class:`LoadBalancer` contract the proxy sockets use
(missing service/endpoints errors, affinity with TTL, reset on a failed dial),
and give every node the same choice for the same client and endpoints.
"""

from __future__ import annotations

from collections import Counter

import pytest

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import LoadBalancer, MissingEndpoints, MissingService
from kproxy.proxy.userspace.maglev import MaglevLoadBalancer

SVC = ServicePortName("ns", "web", "http")
EPS = [f"10.1.0.{i}:8080" for i in range(10)]
CLIENTS = [f"10.2.{i // 250}.{i % 250}" for i in range(2000)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_is_a_load_balancer() -> None:
    lb: LoadBalancer = MaglevLoadBalancer()
    with pytest.raises(MissingService):
        lb.next_endpoint(SVC, "10.0.0.1", False)
    lb.new_service(SVC, False, 0)
    assert not lb.has_endpoints(SVC)
    with pytest.raises(MissingEndpoints):
        lb.next_endpoint(SVC, "10.0.0.1", False)
    lb.set_endpoints(SVC, EPS)
    assert lb.has_endpoints(SVC)
    lb.delete_service(SVC)
    assert not lb.has_endpoints(SVC)


def test_same_choice_on_every_node_and_spread() -> None:
    a, b = MaglevLoadBalancer(), MaglevLoadBalancer()
    for lb, eps in ((a, EPS), (b, list(reversed(EPS)))):  # order of the slice is irrelevant
        lb.new_service(SVC, False, 0)
        lb.set_endpoints(SVC, eps)
    picks = [a.next_endpoint(SVC, c, False) for c in CLIENTS]
    assert picks == [b.next_endpoint(SVC, c, False) for c in CLIENTS]
    assert set(Counter(picks)) == set(EPS)


def test_removal_moves_few_clients() -> None:
    lb = MaglevLoadBalancer()
    lb.new_service(SVC, False, 0)
    lb.set_endpoints(SVC, EPS)
    before = {c: lb.next_endpoint(SVC, c, False) for c in CLIENTS}
    lb.set_endpoints(SVC, EPS[:3] + EPS[4:])
    after = {c: lb.next_endpoint(SVC, c, False) for c in CLIENTS}
    survivors = [c for c in CLIENTS if before[c] != EPS[3]]
    moved = sum(1 for c in survivors if before[c] != after[c])
    assert moved / len(survivors) < 0.02


def test_affinity_and_reset() -> None:
    clock = Clock()
    lb = MaglevLoadBalancer(clock=clock)
    lb.new_service(SVC, True, 60)
    lb.set_endpoints(SVC, EPS)
    first = lb.next_endpoint(SVC, "10.0.0.1", False)
    # A reset (failed dial) walks away from the hashed slot and is remembered.
    others = {lb.next_endpoint(SVC, "10.0.0.1", True) for _ in range(20)}
    assert others - {first}
    sticky = lb.next_endpoint(SVC, "10.0.0.1", True)
    clock.now = 30.0
    assert lb.next_endpoint(SVC, "10.0.0.1", False) == sticky
    # Removing the sticky endpoint drops the record; the hash decides again.
    lb.set_endpoints(SVC, [e for e in EPS if e != sticky])
    assert lb.next_endpoint(SVC, "10.0.0.1", False) != sticky
    clock.now = 1000.0
    lb.cleanup_stale_sticky_sessions(SVC)
