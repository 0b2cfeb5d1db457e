"""The userspace round-robin balancer: upstream roundrobin.go semantics, fake clock."""

from __future__ import annotations

import pytest

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import (
    DEFAULT_AFFINITY_SECONDS,
    MissingEndpoints,
    MissingService,
    RoundRobinLoadBalancer,
)

SVC = ServicePortName("ns", "svc", "p", "TCP")
EPS = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lb(clock: Clock | None = None, shuffle: bool = False) -> RoundRobinLoadBalancer:
    return RoundRobinLoadBalancer(
        clock=clock or Clock(), shuffle=None if shuffle else (lambda _: None)
    )


def test_missing_service_and_endpoints() -> None:
    b = lb()
    with pytest.raises(MissingService):
        b.next_endpoint(SVC, "1.1.1.1", False)
    b.new_service(SVC, False, 0)
    assert not b.has_endpoints(SVC)
    with pytest.raises(MissingEndpoints):
        b.next_endpoint(SVC, "1.1.1.1", False)


def test_round_robin_order_without_affinity() -> None:
    b = lb()
    b.new_service(SVC, False, 0)
    b.set_endpoints(SVC, EPS)
    got = [b.next_endpoint(SVC, "1.1.1.1", False) for _ in range(7)]
    assert got == [*EPS, *EPS, EPS[0]]


def test_same_set_in_another_order_keeps_the_rotation() -> None:
    b = lb()
    b.new_service(SVC, False, 0)
    b.set_endpoints(SVC, EPS)
    assert b.next_endpoint(SVC, "c", False) == EPS[0]
    b.set_endpoints(SVC, tuple(reversed(EPS)))
    assert b.next_endpoint(SVC, "c", False) == EPS[1]


def test_changed_set_is_shuffled_and_restarts() -> None:
    calls: list[list[str]] = []

    def shuffle(items: list[str]) -> None:
        calls.append(list(items))
        items.reverse()

    b = RoundRobinLoadBalancer(clock=Clock(), shuffle=shuffle)
    b.new_service(SVC, False, 0)
    b.set_endpoints(SVC, EPS)
    assert b.endpoints(SVC) == tuple(reversed(EPS))
    b.next_endpoint(SVC, "c", False)
    b.set_endpoints(SVC, EPS[:2])
    assert calls == [list(EPS), list(EPS[:2])]
    assert b.next_endpoint(SVC, "c", False) == EPS[1]  # index back at 0 of the new order


def test_real_shuffle_keeps_the_set() -> None:
    b = lb(shuffle=True)
    b.new_service(SVC, False, 0)
    b.set_endpoints(SVC, EPS)
    assert sorted(b.endpoints(SVC)) == sorted(EPS)
    assert {b.next_endpoint(SVC, "c", False) for _ in range(3)} == set(EPS)


def test_client_ip_affinity_sticks_until_the_ttl() -> None:
    clock = Clock()
    b = lb(clock)
    b.new_service(SVC, True, 10)
    b.set_endpoints(SVC, EPS)
    first = b.next_endpoint(SVC, "1.1.1.1", False)
    other = b.next_endpoint(SVC, "2.2.2.2", False)
    assert first != other
    for _ in range(5):
        clock.now += 9  # each use refreshes the record
        assert b.next_endpoint(SVC, "1.1.1.1", False) == first
    clock.now += 10  # idle for the whole TTL: a new choice
    assert b.next_endpoint(SVC, "1.1.1.1", False) != first


def test_affinity_reset_takes_the_next_endpoint_and_rewrites_the_record() -> None:
    b = lb()
    b.new_service(SVC, True, 0)
    b.set_endpoints(SVC, EPS)
    assert b.next_endpoint(SVC, "c", False) == EPS[0]
    assert b.next_endpoint(SVC, "c", True) == EPS[1]
    assert b.next_endpoint(SVC, "c", False) == EPS[1]
    assert b.sticky_clients(SVC) == {"c": EPS[1]}


def test_ttl_zero_means_the_api_default() -> None:
    clock = Clock()
    b = lb(clock)
    b.new_service(SVC, True, 0)
    b.set_endpoints(SVC, EPS)
    first = b.next_endpoint(SVC, "c", False)
    clock.now += DEFAULT_AFFINITY_SECONDS - 1
    assert b.next_endpoint(SVC, "c", False) == first


def test_stale_records_removed_with_their_endpoint_and_by_cleanup() -> None:
    clock = Clock()
    b = lb(clock)
    b.new_service(SVC, True, 10)
    b.set_endpoints(SVC, EPS)
    assert b.next_endpoint(SVC, "a", False) == EPS[0]
    assert b.next_endpoint(SVC, "b", False) == EPS[1]
    assert b.next_endpoint(SVC, "c", False) == EPS[2]
    b.set_endpoints(SVC, EPS[1:])  # EPS[0] gone: a's record goes with it
    assert set(b.sticky_clients(SVC)) == {"b", "c"}
    clock.now += 5
    b.next_endpoint(SVC, "b", False)
    clock.now += 6
    b.cleanup_stale_sticky_sessions(SVC)  # c idle 11 s > 10 s; b 6 s
    assert set(b.sticky_clients(SVC)) == {"b"}


def test_turning_affinity_off_forgets_clients() -> None:
    b = lb()
    b.new_service(SVC, True, 0)
    b.set_endpoints(SVC, EPS)
    b.next_endpoint(SVC, "c", False)
    b.new_service(SVC, False, 0)
    assert b.sticky_clients(SVC) == {}
    assert b.next_endpoint(SVC, "c", False) == EPS[1]  # plain rotation continues


def test_delete_service() -> None:
    b = lb()
    b.new_service(SVC, False, 0)
    b.set_endpoints(SVC, EPS)
    b.delete_service(SVC)
    with pytest.raises(MissingService):
        b.next_endpoint(SVC, "c", False)
