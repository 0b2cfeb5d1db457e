"""IpvsBatch: wire encoding (checked with pyroute2's decoder), the one-by-one fake, the VM.

The unit tests need no kernel: requests are decoded with pyroute2's ``ipvsmsg``
and compared attribute by attribute, and :class:`IpvsOneByOne` over the fake
gives the results and message counts the proxy relies on.  The ``vm`` tests hold
:class:`IpvsBatch` to the same results on the guest's real IPVS table, and time
1,000 services × 10 destinations batched against one request at a time (the
numbers go to the log and, when run by the vm tier, to ``ipvs_batch_timing.txt``
beside the tier's report; timings are reported, never asserted).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.kernel.fakes.ipvs import FakeIpvs
from kproxy.kernel.ipvs import (
    ForwardingMethod,
    IPProtocol,
    Ipvs,
    RealServer,
    ServiceFlags,
    VirtualServer,
)
from kproxy.kernel.ipvs_batch import (
    IpvsBatch,
    IpvsBatchError,
    IpvsBulkVerbs,
    IpvsOneByOne,
    IpvsOp,
    OpKind,
)
from kproxy.kernel.ipvs_wire import _DEST_KINDS, Encoder, encode_op

VS = VirtualServer(ip_address("10.96.0.10"), 80, IPProtocol.TCP, scheduler="rr")
VS6 = VirtualServer(ip_address("fd00:96::10"), 443, IPProtocol.UDP, scheduler="mh",
                    flags=ServiceFlags.PERSISTENT | ServiceFlags.SCHED2, timeout=10800)  # fmt: skip
RS = RealServer(ip_address("10.244.1.5"), 8080, weight=1)
RS2 = RealServer(ip_address("10.244.2.7"), 8080, weight=3)
RS6 = RealServer(ip_address("fd00:244::5"), 8443)


# --- encoding, decoded by pyroute2 ----------------------------------------------------------


def _decode(data: bytes) -> object:
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    msg = ipvsmsg(data)
    msg.decode()
    return msg


def _nested(msg: object, name: str) -> dict[str, object]:
    return dict(msg.get_attr(name)["attrs"])  # type: ignore[attr-defined]


def test_add_service_carries_every_setting() -> None:
    msg = _decode(encode_op(IpvsOp.add_service(VS), family_id=37, seq=7))
    hdr = msg["header"]  # type: ignore[index]
    assert (hdr["type"], hdr["sequence_number"], hdr["flags"]) == (37, 7, 0x1 | 0x4 | 0x400 | 0x200)
    assert msg["cmd"] == 1 and msg["version"] == 1  # type: ignore[index]
    svc = _nested(msg, "IPVS_CMD_ATTR_SERVICE")
    assert svc["IPVS_SVC_ATTR_AF"] == 2
    assert svc["IPVS_SVC_ATTR_ADDR"] == "10.96.0.10"
    assert svc["IPVS_SVC_ATTR_PORT"] == 80
    assert svc["IPVS_SVC_ATTR_PROTOCOL"] == 6
    assert svc["IPVS_SVC_ATTR_SCHED_NAME"] == "rr"
    assert svc["IPVS_SVC_ATTR_FLAGS"]["flags"] == 0  # type: ignore[index]
    assert svc["IPVS_SVC_ATTR_FLAGS"]["mask"] == 0xFFFFFFFF  # type: ignore[index]
    assert svc["IPVS_SVC_ATTR_TIMEOUT"] == 0
    assert svc["IPVS_SVC_ATTR_NETMASK"] == "255.255.255.255"


def test_ipv6_service_netmask_is_the_raw_prefix_length() -> None:
    import sys

    msg = _decode(encode_op(IpvsOp.edit_service(VS6), 37, 1))
    svc = _nested(msg, "IPVS_CMD_ATTR_SERVICE")
    assert svc["IPVS_SVC_ATTR_ADDR"] == "fd00:96::10"
    assert svc["IPVS_SVC_ATTR_AF"] == 10
    assert svc["IPVS_SVC_ATTR_FLAGS"]["flags"] == 0x11  # type: ignore[index]
    assert svc["IPVS_SVC_ATTR_TIMEOUT"] == 10800
    expected = ".".join(str(b) for b in (128).to_bytes(4, sys.byteorder))
    assert svc["IPVS_SVC_ATTR_NETMASK"] == expected


def test_destination_ops_send_the_service_key_and_a_full_nat_destination() -> None:
    msg = _decode(encode_op(IpvsOp.edit_destination(VS, RS2), 37, 2))
    assert msg["cmd"] == 6  # type: ignore[index]
    svc = _nested(msg, "IPVS_CMD_ATTR_SERVICE")
    assert set(svc) == {"IPVS_SVC_ATTR_AF", "IPVS_SVC_ATTR_PROTOCOL", "IPVS_SVC_ATTR_ADDR",
                        "IPVS_SVC_ATTR_PORT"}  # fmt: skip
    dest = _nested(msg, "IPVS_CMD_ATTR_DEST")
    assert dest["IPVS_DEST_ATTR_ADDR"] == "10.244.2.7"
    assert dest["IPVS_DEST_ATTR_PORT"] == 8080
    assert dest["IPVS_DEST_ATTR_WEIGHT"] == 3
    assert dest["IPVS_DEST_ATTR_FWD_METHOD"] == int(ForwardingMethod.MASQ)
    assert dest["IPVS_DEST_ATTR_ADDR_FAMILY"] == 2
    assert (dest["IPVS_DEST_ATTR_U_THRESH"], dest["IPVS_DEST_ATTR_L_THRESH"]) == (0, 0)
    delete = _decode(encode_op(IpvsOp.delete_destination(VS, RS2), 37, 3))
    assert delete["cmd"] == 7  # type: ignore[index]
    assert "IPVS_DEST_ATTR_WEIGHT" not in _nested(delete, "IPVS_CMD_ATTR_DEST")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([VS, VS6, replace(VS, port=81), replace(VS6, scheduler="rr")]),
            st.sampled_from(list(OpKind)),
            st.integers(0, 2**32 - 1).map(lambda n: ip_address(n)) | st.sampled_from([RS6.address]),
            st.integers(1, 65535),
            st.integers(0, 100),
            st.sampled_from(list(ForwardingMethod)),
        ),
        max_size=30,
    )
)
def test_the_batch_encoder_writes_exactly_what_encode_op_writes(cases: list[tuple]) -> None:
    # Encoder is the fast path of apply(); encode_op is the reference the pyroute2
    # decoding tests above check.  Same bytes for every kind, family and field.
    encoder = Encoder(37)
    for seq, (vs, kind, address, port, weight, fwd) in enumerate(cases, 1):
        rs = RealServer(address, port, weight, fwd)
        op = IpvsOp(kind, vs, rs if kind in _DEST_KINDS else None)
        assert encoder.encode(op, seq) == encode_op(op, 37, seq)


def test_op_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        IpvsOp(OpKind.ADD_DESTINATION, VS)
    with pytest.raises(ValueError):
        IpvsOp(OpKind.ADD_SERVICE, VS, RS)
    assert (
        str(IpvsOp.add_destination(VS, RS)) == "add-destination 10.96.0.10:80/TCP 10.244.1.5:8080"
    )


# --- the contract, fake and real ------------------------------------------------------------


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.vm)])
def bulk(request: pytest.FixtureRequest) -> Iterator[IpvsBulkVerbs]:
    handle: IpvsBulkVerbs
    if request.param == "fake":
        handle = IpvsOneByOne(FakeIpvs())
    else:
        assert os.environ.get("KPROXY_IN_VM") == "1", "real-kernel IPVS only inside the VM"
        handle = IpvsBatch()
    _flush(handle)
    try:
        yield handle
    finally:
        _flush(handle)
        handle.close()


def _flush(handle: IpvsBulkVerbs) -> None:
    handle.apply(IpvsOp.delete_service(vs) for vs in handle.dump()).raise_for_failures()


def test_apply_then_dump(bulk: IpvsBulkVerbs) -> None:
    ops = [
        IpvsOp.add_service(VS),
        IpvsOp.add_destination(VS, RS),
        IpvsOp.add_destination(VS, RS2),
        IpvsOp.add_service(VS6),
        IpvsOp.add_destination(VS6, RS6),
    ]
    result = bulk.apply(ops)
    assert result.ok
    assert result.messages == 5
    table = bulk.dump()
    assert set(table) == {VS, VS6}
    assert sorted(table[VS], key=str) == [RS, RS2]
    assert table[VS6] == [RS6]
    assert {rs.forwarding for rs in table[VS]} == {ForwardingMethod.MASQ}


def test_one_endpoint_change_is_one_message(bulk: IpvsBulkVerbs) -> None:
    bulk.apply([IpvsOp.add_service(VS), IpvsOp.add_destination(VS, RS)]).raise_for_failures()
    before = bulk.messages_sent
    result = bulk.apply([IpvsOp.add_destination(VS, RS2)])
    assert (result.messages, bulk.messages_sent - before) == (1, 1)
    result = bulk.apply([IpvsOp.edit_destination(VS, replace(RS, weight=0))])
    assert result.messages == 1
    assert {rs.key: rs.weight for rs in bulk.dump()[VS]} == {RS.key: 0, RS2.key: 3}


def test_failures_are_reported_and_do_not_stop_the_rest(bulk: IpvsBulkVerbs) -> None:
    other = replace(VS, port=81)
    result = bulk.apply([
        IpvsOp.add_service(VS),
        IpvsOp.add_service(VS),  # EEXIST
        IpvsOp.delete_destination(VS, RS),  # ENOENT
        IpvsOp.add_destination(other, RS),  # ESRCH: no such service
        IpvsOp.add_destination(VS, RS6),  # EINVAL: other family
        IpvsOp.add_destination(VS, RS),
        IpvsOp.edit_service(replace(VS, scheduler="wrr")),
    ])  # fmt: skip
    assert [(f.op.kind, f.errno) for f in result.failures] == [
        (OpKind.ADD_SERVICE, errno.EEXIST),
        (OpKind.DELETE_DESTINATION, errno.ENOENT),
        (OpKind.ADD_DESTINATION, errno.ESRCH),
        (OpKind.ADD_DESTINATION, errno.EINVAL),
    ]
    assert bulk.dump() == {replace(VS, scheduler="wrr"): [RS]}
    with pytest.raises(IpvsBatchError) as err:
        result.raise_for_failures()
    assert "EEXIST" in str(err.value)


def test_delete_service_and_destination(bulk: IpvsBulkVerbs) -> None:
    setup = [IpvsOp.add_service(VS), IpvsOp.add_destination(VS, RS)]
    setup += [IpvsOp.add_destination(VS, RS2), IpvsOp.add_service(VS6)]
    bulk.apply(setup).raise_for_failures()
    bulk.apply([IpvsOp.delete_destination(VS, RS), IpvsOp.delete_service(VS6)]).raise_for_failures()
    assert bulk.dump() == {VS: [RS2]}


# --- scale, in the VM -------------------------------------------------------------------------


def _table(services: int, dests: int) -> dict[VirtualServer, list[RealServer]]:
    table = {}
    for i in range(services):
        vs = VirtualServer(ip_address(f"10.96.{i // 250}.{i % 250 + 1}"), 80, IPProtocol.TCP)
        table[vs] = [
            RealServer(ip_address(f"10.244.{j}.{i % 250 + 1}"), 8080) for j in range(dests)
        ]
    return table


def _ops(table: dict[VirtualServer, list[RealServer]]) -> list[IpvsOp]:
    ops = []
    for vs, dests in table.items():
        ops.append(IpvsOp.add_service(vs))
        ops += [IpvsOp.add_destination(vs, rs) for rs in dests]
    return ops


def _timed(
    handle: IpvsBulkVerbs, table: dict[VirtualServer, list[RealServer]]
) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    result = handle.apply(_ops(table))
    t1 = time.perf_counter()
    result.raise_for_failures()
    got = handle.dump()
    t2 = time.perf_counter()
    assert {vs: sorted(d, key=str) for vs, d in got.items()} == {
        vs: sorted(d, key=str) for vs, d in table.items()
    }
    handle.apply(IpvsOp.delete_service(vs) for vs in table).raise_for_failures()
    return t1 - t0, t2 - t1, result.round_trips


def _report(lines: list[str]) -> None:
    print("\n".join(lines))
    report = os.environ.get("KPROXY_VM_REPORT")
    if report:
        Path(report).with_name("ipvs_batch_timing.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.vm
def test_thousand_services_times_ten_destinations() -> None:
    assert os.environ.get("KPROXY_IN_VM") == "1", "real-kernel IPVS only inside the VM"
    big, small = _table(1000, 10), _table(30, 10)
    lines = []
    with IpvsBatch() as batch:
        _flush(batch)
        apply_s, dump_s, trips = _timed(batch, big)
        lines.append(
            f"batch (chunks of {batch.chunk_messages}) 1000x10: apply {apply_s:.3f} s "
            f"in {trips} round trips; dump {dump_s:.3f} s"
        )
    with IpvsBatch(chunk_messages=1) as single:
        apply_s1, _, trips1 = _timed(single, big)
        lines.append(f"raw socket, 1 per trip 1000x10: apply {apply_s1:.3f} s in {trips1} trips")
    # pyroute2 one request at a time (the existing Ipvs verbs) is slow under emulation:
    # 30 services x 10 destinations, compared per operation.
    pyr = IpvsOneByOne(Ipvs())
    try:
        apply_p, dump_p, trips_p = _timed(pyr, small)
    finally:
        pyr.close()
    per_op_batch = apply_s / (len(big) * 11)
    per_op_pyr = apply_p / (len(small) * 11)
    lines.append(
        f"pyroute2 Ipvs one by one 30x10: apply {apply_p:.3f} s in {trips_p} trips; "
        f"dump {dump_p:.3f} s"
    )
    lines.append(
        f"per op: batch {per_op_batch * 1e6:.1f} us, raw 1/trip "
        f"{apply_s1 / (len(big) * 11) * 1e6:.1f} us, pyroute2 {per_op_pyr * 1e6:.1f} us; "
        f"batch speed-up vs pyroute2 x{per_op_pyr / per_op_batch:.1f}"
    )
    _report(lines)
