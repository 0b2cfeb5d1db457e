"""One contract for IPVS, held by the fake and by the real kernel (inside the VM).

Every test takes the ``ipvs`` fixture, parametrized over :class:`FakeIpvs` and
the real :class:`Ipvs`; the real one is marked ``vm`` and only ever runs inside
the guest, which starts each test from an empty IPVS table.  The addresses are
documentation/ULA ones that exist only in the guest's table: no traffic is sent.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest

from kproxy.errors import KProxyError
from kproxy.kernel.fakes.ipvs import FakeIpvs
from kproxy.kernel.ipvs import (
    ForwardingMethod,
    IPProtocol,
    Ipvs,
    IpvsError,
    IpvsVerbs,
    RealServer,
    ServiceFlags,
    VirtualServer,
)
from tests.support.tiers import require_root

TCP_VS = VirtualServer(ip_address("10.96.0.10"), 80, IPProtocol.TCP, scheduler="rr")
UDP_VS = VirtualServer(ip_address("10.96.0.10"), 53, IPProtocol.UDP, scheduler="rr")
V6_VS = VirtualServer(ip_address("fd00:96::10"), 443, IPProtocol.TCP, scheduler="rr")
RS = RealServer(ip_address("10.244.1.5"), 8080, weight=1, forwarding=ForwardingMethod.MASQ)
RS2 = RealServer(ip_address("10.244.2.7"), 8080, weight=1)
RS6 = RealServer(ip_address("fd00:244::5"), 8443, weight=1)


def _flush(handle: IpvsVerbs) -> None:
    for vs in handle.list_services():
        handle.delete_service(vs)


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.vm)])
def ipvs(request: pytest.FixtureRequest) -> Iterator[IpvsVerbs]:
    handle: IpvsVerbs
    if request.param == "fake":
        handle = FakeIpvs()
    else:
        # Never program the host's IPVS table: the vm tier keeps this fixture out of
        # the host, and this guard keeps it out even without the tier's plugin.
        assert os.environ.get("KPROXY_IN_VM") == "1", "real-kernel IPVS only inside the VM"
        require_root()
        handle = Ipvs()
    _flush(handle)
    try:
        yield handle
    finally:
        try:
            _flush(handle)
        except IpvsError as e:
            if e.errno != errno.EBADF:  # a test that closed its handle has nothing to flush
                raise
        handle.close()


def _sorted_services(handle: IpvsVerbs) -> list[VirtualServer]:
    return sorted(handle.list_services(), key=str)


def test_tcp_and_udp_services_are_listed_exactly(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_service(UDP_VS)
    listed = _sorted_services(ipvs)
    assert listed == sorted([TCP_VS, UDP_VS], key=str)
    for vs in listed:
        assert vs.scheduler == "rr"
        assert vs.netmask == 0xFFFFFFFF
        assert vs.flags == ServiceFlags.NONE
        assert vs.timeout == 0


def test_nat_destination_round_trips(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_destination(TCP_VS, RS)
    [got] = ipvs.list_destinations(TCP_VS)
    assert got == RS
    assert got.forwarding is ForwardingMethod.MASQ
    assert got.weight == 1
    assert (got.active_connections, got.inactive_connections) == (0, 0)


def test_set_weight(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_destination(TCP_VS, RS)
    ipvs.add_destination(TCP_VS, RS2)
    ipvs.set_destination(TCP_VS, replace(RS, weight=0))
    weights = {rs.address: rs.weight for rs in ipvs.list_destinations(TCP_VS)}
    assert weights == {RS.address: 0, RS2.address: 1}
    ipvs.set_destination(TCP_VS, replace(RS, weight=7))
    assert {rs.weight for rs in ipvs.list_destinations(TCP_VS) if rs.key == RS.key} == {7}
    # "set" keeps the forwarding method we sent, not pyroute2's direct-routing default
    assert {rs.forwarding for rs in ipvs.list_destinations(TCP_VS)} == {ForwardingMethod.MASQ}


def test_delete_destination(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_destination(TCP_VS, RS)
    ipvs.add_destination(TCP_VS, RS2)
    ipvs.delete_destination(TCP_VS, RS)
    assert ipvs.list_destinations(TCP_VS) == [RS2]


def test_delete_service_takes_its_destinations(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_service(UDP_VS)
    ipvs.add_destination(TCP_VS, RS)
    ipvs.delete_service(TCP_VS)
    assert ipvs.list_services() == [UDP_VS]
    assert ipvs.list_destinations(TCP_VS) == []


def test_duplicate_service_errors_with_its_input(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    with pytest.raises(IpvsError) as err:
        ipvs.add_service(replace(TCP_VS, scheduler="wrr"))
    assert isinstance(err.value, KProxyError)
    assert err.value.errno == errno.EEXIST
    assert err.value.verb == "add-service"
    assert err.value.service == replace(TCP_VS, scheduler="wrr")
    assert str(TCP_VS) in str(err.value)
    assert ipvs.list_services() == [TCP_VS]


def test_duplicate_destination_errors(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_destination(TCP_VS, RS)
    with pytest.raises(IpvsError) as err:
        ipvs.add_destination(TCP_VS, replace(RS, weight=3))
    assert err.value.errno == errno.EEXIST
    assert err.value.destination == replace(RS, weight=3)
    assert ipvs.list_destinations(TCP_VS) == [RS]


def test_deleting_a_missing_service_errors(ipvs: IpvsVerbs) -> None:
    with pytest.raises(IpvsError) as err:
        ipvs.delete_service(TCP_VS)
    assert err.value.errno == errno.ESRCH
    assert err.value.service == TCP_VS


def test_deleting_or_setting_a_missing_destination_errors(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    with pytest.raises(IpvsError) as err:
        ipvs.delete_destination(TCP_VS, RS)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(IpvsError) as err:
        ipvs.set_destination(TCP_VS, RS)
    assert err.value.errno == errno.ENOENT


def test_destination_verbs_on_a_missing_service(ipvs: IpvsVerbs) -> None:
    with pytest.raises(IpvsError) as err:
        ipvs.add_destination(TCP_VS, RS)
    assert err.value.errno == errno.ESRCH
    with pytest.raises(IpvsError) as err:
        ipvs.delete_destination(TCP_VS, RS)
    assert err.value.errno == errno.ESRCH
    assert ipvs.list_destinations(TCP_VS) == []


def test_ipv6_service_and_destination(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(V6_VS)
    ipvs.add_destination(V6_VS, RS6)
    [vs] = ipvs.list_services()
    assert vs == V6_VS
    assert vs.netmask == 128
    assert vs.address == ip_address("fd00:96::10")
    assert ipvs.list_destinations(V6_VS) == [RS6]


def test_persistence_and_flags_round_trip(ipvs: IpvsVerbs) -> None:
    sticky = replace(UDP_VS, flags=ServiceFlags.PERSISTENT, timeout=10800)
    ipvs.add_service(sticky)
    [vs] = ipvs.list_services()
    assert vs == sticky  # the kernel's own HASHED flag is not reported
    assert vs.flags == ServiceFlags.PERSISTENT
    assert vs.timeout == 10800


def test_set_service_changes_scheduler(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    ipvs.add_destination(TCP_VS, RS)
    # wrr/mh are not preloaded in the guest: this also checks the kernel autoloads them
    mh = replace(TCP_VS, scheduler="mh", flags=ServiceFlags.SCHED2)
    ipvs.set_service(mh)
    assert ipvs.list_services() == [mh]
    assert ipvs.list_destinations(TCP_VS) == [RS]
    with pytest.raises(IpvsError) as err:
        ipvs.set_service(UDP_VS)
    assert err.value.errno == errno.ESRCH


def test_unknown_scheduler_errors(ipvs: IpvsVerbs) -> None:
    with pytest.raises(IpvsError) as err:
        ipvs.add_service(replace(TCP_VS, scheduler="nosuchsched"))
    assert err.value.errno == errno.ENOENT
    assert ipvs.list_services() == []


def test_destination_of_the_other_family_errors(ipvs: IpvsVerbs) -> None:
    ipvs.add_service(TCP_VS)
    with pytest.raises(IpvsError) as err:
        ipvs.add_destination(TCP_VS, RS6)
    assert err.value.errno == errno.EINVAL


def test_closed_handle_errors(ipvs: IpvsVerbs) -> None:
    ipvs.close()
    with pytest.raises(IpvsError) as err:
        ipvs.list_services()
    assert err.value.errno == errno.EBADF


# --- value types (no kernel) ----------------------------------------------------------


def test_netmask_defaults_per_family() -> None:
    assert TCP_VS.netmask == 0xFFFFFFFF
    assert V6_VS.netmask == 128
    assert TCP_VS.scheduler == "rr"


def test_hashed_flag_is_never_kept() -> None:
    vs = replace(TCP_VS, flags=ServiceFlags.PERSISTENT | ServiceFlags.HASHED)
    assert vs.flags == ServiceFlags.PERSISTENT


def test_counters_do_not_take_part_in_equality() -> None:
    assert replace(RS, active_connections=3, inactive_connections=9) == RS


@pytest.mark.parametrize("port", [-1, 65536])
def test_port_range_is_checked(port: int) -> None:
    with pytest.raises(ValueError):
        VirtualServer(ip_address("10.0.0.1"), port, IPProtocol.TCP)
    with pytest.raises(ValueError):
        RealServer(ip_address("10.0.0.1"), port)


def test_addresses_must_be_ipaddress_objects() -> None:
    with pytest.raises(TypeError):
        VirtualServer("10.0.0.1", 80, IPProtocol.TCP)  # type: ignore[arg-type]


def test_error_names_its_input() -> None:
    e = IpvsError("add-destination", V6_VS, RS6, errno.EEXIST)
    assert (
        str(e) == "ipvs add-destination [fd00:96::10]:443/TCP [fd00:244::5]:8443: EEXIST (errno 17)"
    )
