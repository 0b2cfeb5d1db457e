"""One contract for the ipset verbs: the fake and the real kernel in a fresh netns.

Every ``ipset`` test runs against :class:`~kproxy.kernel.fakes.ipset.FakeIpset`
and against :class:`~kproxy.kernel.ipset.Ipset` inside a throwaway namespace
(tier netns; this host's kernel has ``ip_set``).  pyroute2's ``IPSet`` cannot be
opened in another namespace, so the real handle lives in a forked child that
``setns``'s into the test namespace first and serves the verbs over a pipe: the
test process itself never leaves the root namespace and never opens an ipset
socket there.  The sets are checked from outside with the ``ipset`` command too.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import multiprocessing
import multiprocessing.connection
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.kernel.fakes.ipset import FakeIpset
from kproxy.kernel.ipset import ERR_EXIST, Ipset, IpsetBatchResult, IpsetError, IpsetVerbs
from kproxy.kernel.ipset_wire import AdtEncoder, SetInfo, canonical_entry, encode_adt, parse_entry
from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require_commands

_CALL_TIMEOUT_S = 30.0


def _serve(conn: multiprocessing.connection.Connection, netns: str) -> None:
    from pyroute2.netns import setns

    setns(netns, flags=0)  # never create: the fixture made it
    handle = Ipset()
    while True:
        msg = conn.recv()
        if msg is None:
            handle.close()
            return
        method, args = msg
        try:
            value = getattr(handle, method)  # a verb, or a counter such as round_trips
            conn.send(("ok", value(*args) if callable(value) else value))
        except Exception as e:  # sent back and re-raised in the test
            conn.send(("err", e))


class InNetns:
    """An :class:`IpsetVerbs` whose calls run in a child process inside ``netns``."""

    def __init__(self, ns: Netns) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, ns.name), daemon=True)
        self._proc.start()
        child.close()
        self._closed = False

    def _call(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise IpsetError(method, None, None, errno.EBADF, "handle is closed")
        self._conn.send((method, args))
        if not self._conn.poll(_CALL_TIMEOUT_S):
            raise TimeoutError(f"ipset {method} did not answer")
        status, value = self._conn.recv()
        if status == "err":
            raise value
        return value

    def create(self, name: str, set_type: Any, family: Any = "ipv4") -> None:
        self._call("create", name, set_type, family)

    def destroy(self, name: str) -> None:
        self._call("destroy", name)

    def list_sets(self) -> dict[str, SetInfo]:
        return self._call("list_sets")  # type: ignore[no-any-return]

    def list_entries(self, name: str) -> set[str]:
        return self._call("list_entries", name)  # type: ignore[no-any-return]

    def add_entry(self, name: str, entry: str) -> None:
        self._call("add_entry", name, entry)

    def delete_entry(self, name: str, entry: str) -> None:
        self._call("delete_entry", name, entry)

    def sync_entries(self, name: str, desired: Any) -> tuple[set[str], set[str]]:
        return self._call("sync_entries", name, list(desired))  # type: ignore[no-any-return]

    def add_entries(self, name: str, entries: Any) -> IpsetBatchResult:
        return self._call("add_entries", name, list(entries))  # type: ignore[no-any-return]

    def delete_entries(self, name: str, entries: Any) -> IpsetBatchResult:
        return self._call("delete_entries", name, list(entries))  # type: ignore[no-any-return]

    def create_many(self, specs: Any) -> IpsetBatchResult:
        return self._call("create_many", list(specs))  # type: ignore[no-any-return]

    def list_all_entries(self) -> dict[str, set[str]]:
        return self._call("list_all_entries")  # type: ignore[no-any-return]

    @property
    def round_trips(self) -> int:
        return self._call("round_trips")  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):  # the child may be gone already
            self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.netns)])
def env(request: pytest.FixtureRequest) -> Iterator[tuple[IpsetVerbs, Netns | None]]:
    if request.param == "fake":
        fake = FakeIpset()
        yield fake, None
        fake.close()
        return
    factory: NetnsFactory = request.getfixturevalue("netns")
    ns = factory()
    handle = InNetns(ns)
    try:
        yield handle, ns
    finally:
        handle.close()


@pytest.fixture
def ipset(env: tuple[IpsetVerbs, Netns | None]) -> IpsetVerbs:
    return env[0]


def _cli_members(ns: Netns, name: str) -> set[str]:
    out = ns.run(["ipset", "list", name]).stdout
    return set(out.split("Members:\n", 1)[1].split())


# --- the contract -----------------------------------------------------------------------


def test_hash_ip_port_round_trips(ipset: IpsetVerbs) -> None:
    ipset.create("KUBE-CLUSTER-IP", "hash:ip,port")
    ipset.add_entry("KUBE-CLUSTER-IP", "10.96.0.10,udp:53")
    ipset.add_entry("KUBE-CLUSTER-IP", "10.96.0.1,TCP:443")
    assert ipset.list_entries("KUBE-CLUSTER-IP") == {"10.96.0.10,udp:53", "10.96.0.1,tcp:443"}
    assert ipset.list_sets() == {"KUBE-CLUSTER-IP": SetInfo("hash:ip,port", "ipv4")}


@pytest.mark.parametrize(
    ("set_type", "family", "entries"),
    [
        ("hash:ip", "ipv4", {"10.96.0.10", "10.96.0.11"}),
        ("hash:ip", "ipv6", {"fd00:96::10"}),
        ("hash:ip,port", "ipv6", {"fd00:96::10,tcp:80", "fd00:96::10,sctp:80"}),
        ("hash:ip,port,ip", "ipv4", {"10.244.1.5,tcp:8080,10.244.1.5"}),
        ("hash:ip,port,net", "ipv4", {"1.2.3.4,tcp:80,10.0.0.0/8", "1.2.3.4,udp:80,0.0.0.0/1"}),
        ("hash:ip,port,net", "ipv6", {"fd00::4,tcp:80,fd00:1::/64"}),
        ("bitmap:port", "ipv4", {"30080", "0", "65535"}),
    ],
)
def test_every_upstream_type_round_trips(
    ipset: IpsetVerbs, set_type: Any, family: Any, entries: set[str]
) -> None:
    ipset.create("S", set_type, family)
    for entry in entries:
        ipset.add_entry("S", entry)
    assert ipset.list_entries("S") == entries
    info = ipset.list_sets()["S"]
    assert info.type == set_type
    assert info.family == (None if set_type == "bitmap:port" else family)


def test_entries_are_canonical(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port,net", "ipv6")
    ipset.add_entry("S", "FD00:0::4,TCP:80,fd00:1::17/64")
    assert ipset.list_entries("S") == {"fd00::4,tcp:80,fd00:1::/64"}
    # the same entry in another spelling is already there
    ipset.add_entry("S", "fd00::4,tcp:80,fd00:1::/64")
    assert len(ipset.list_entries("S")) == 1


def test_create_is_idempotent_but_not_across_types(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    ipset.add_entry("S", "10.0.0.1,tcp:1")
    ipset.create("S", "hash:ip,port")  # -exist: keeps the members
    assert ipset.list_entries("S") == {"10.0.0.1,tcp:1"}
    with pytest.raises(IpsetError) as err:
        ipset.create("S", "hash:ip")
    assert err.value.errno == errno.EEXIST
    assert err.value.name == "S"


def test_add_is_idempotent_delete_is_not(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip")
    ipset.add_entry("S", "10.0.0.1")
    ipset.add_entry("S", "10.0.0.1")
    ipset.delete_entry("S", "10.0.0.1")
    assert ipset.list_entries("S") == set()
    with pytest.raises(IpsetError) as err:
        ipset.delete_entry("S", "10.0.0.1")
    assert err.value.errno == ERR_EXIST
    assert err.value.entry == "10.0.0.1"


def test_missing_set_errors(ipset: IpsetVerbs) -> None:
    for call in (
        lambda: ipset.list_entries("NOPE"),
        lambda: ipset.add_entry("NOPE", "10.0.0.1"),
        lambda: ipset.delete_entry("NOPE", "10.0.0.1"),
        lambda: ipset.destroy("NOPE"),
        lambda: ipset.sync_entries("NOPE", {"10.0.0.1"}),
    ):
        with pytest.raises(IpsetError) as err:
            call()
        assert err.value.errno == errno.ENOENT
        assert err.value.name == "NOPE"


def test_malformed_or_other_family_entries_error(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    for bad in ("10.0.0.1", "10.0.0.1,icmp:1", "10.0.0.1,tcp:70000", "fd00::1,tcp:80"):
        with pytest.raises(IpsetError) as err:
            ipset.add_entry("S", bad)
        assert err.value.errno == errno.EINVAL, bad
        assert err.value.entry == bad
    with pytest.raises(IpsetError) as err:
        ipset.sync_entries("S", {"10.0.0.1,tcp:80", "nonsense"})
    assert err.value.errno == errno.EINVAL
    assert ipset.list_entries("S") == set()  # nothing was sent


def test_sync_sends_only_the_difference(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    assert ipset.sync_entries("S", {"10.0.0.1,tcp:80", "10.0.0.2,tcp:80"}) == (
        {"10.0.0.1,tcp:80", "10.0.0.2,tcp:80"},
        set(),
    )
    added, removed = ipset.sync_entries("S", ["10.0.0.2,TCP:80", "10.0.0.3,udp:53"])
    assert (added, removed) == ({"10.0.0.3,udp:53"}, {"10.0.0.1,tcp:80"})
    assert ipset.sync_entries("S", {"10.0.0.2,tcp:80", "10.0.0.3,udp:53"}) == (set(), set())
    assert ipset.list_entries("S") == {"10.0.0.2,tcp:80", "10.0.0.3,udp:53"}
    assert ipset.sync_entries("S", set()) == (set(), {"10.0.0.2,tcp:80", "10.0.0.3,udp:53"})


def test_many_entries_list_in_one_dump(ipset: IpsetVerbs) -> None:
    # More members than fit one netlink message: the listing spans several.
    ipset.create("S", "hash:ip,port")
    want = {f"10.96.{i // 250}.{i % 250},tcp:{1000 + i}" for i in range(2000)}
    added, _ = ipset.sync_entries("S", want)
    assert added == want
    assert ipset.list_entries("S") == want


# --- the batch verbs ----------------------------------------------------------------------

_BATCH_ENTRIES = {
    "hash:ip": ["10.0.0.1", "10.0.0.2"],
    "hash:ip,port": ["10.0.0.1,tcp:80", "10.0.0.1,UDP:53", "10.0.0.2,sctp:9"],
    "hash:ip,port,ip": ["10.0.0.1,tcp:80,10.0.0.1", "10.0.0.2,udp:53,10.0.0.9"],
    "hash:ip,port,net": ["1.2.3.4,tcp:80,10.1.2.3/8", "1.2.3.4,tcp:80,192.168.0.0/16"],
    "bitmap:port": ["30080", "0", "65535"],
}


@pytest.mark.parametrize("set_type", sorted(_BATCH_ENTRIES))
def test_batch_add_and_delete_every_type(ipset: IpsetVerbs, set_type: Any) -> None:
    ipset.create("S", set_type)
    entries = _BATCH_ENTRIES[set_type]
    canon = {canonical_entry(set_type, e) for e in entries}
    result = ipset.add_entries("S", entries)
    assert result.ok and result.done == canon
    assert (result.messages, result.round_trips) == (len(canon), 1)
    assert ipset.list_entries("S") == canon
    again = ipset.add_entries("S", entries)  # -exist: present entries are fine
    assert again.ok and again.done == canon
    first = sorted(canon)[0]
    gone = ipset.delete_entries("S", [first])
    assert gone.ok and gone.done == {first}
    assert ipset.list_entries("S") == canon - {first}


def test_batch_ipv6(ipset: IpsetVerbs) -> None:
    ipset.create("S6", "hash:ip,port,net", "ipv6")
    result = ipset.add_entries("S6", ["fd00::1,tcp:80,fd00:1::/64", "fd00::2,udp:53,fd00:2::/48"])
    assert result.ok
    assert ipset.list_entries("S6") == {"fd00::1,tcp:80,fd00:1::/64", "fd00::2,udp:53,fd00:2::/48"}


def test_batch_delete_reports_missing_entries_one_by_one(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    ipset.add_entries("S", ["10.0.0.1,tcp:80", "10.0.0.2,tcp:80"]).raise_for_failures()
    result = ipset.delete_entries("S", ["10.0.0.1,tcp:80", "10.0.0.3,tcp:80", "10.0.0.2,tcp:80"])
    assert result.done == {"10.0.0.1,tcp:80", "10.0.0.2,tcp:80"}
    assert [(f.entry, f.errno) for f in result.failures] == [("10.0.0.3,tcp:80", ERR_EXIST)]
    assert ipset.list_entries("S") == set()  # the failure stopped nothing after it
    with pytest.raises(IpsetError) as err:
        result.raise_for_failures()
    assert err.value.errno == ERR_EXIST


def test_batch_is_chunked(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    want = {f"10.97.{i // 250}.{i % 250},tcp:{1000 + i}" for i in range(1000)}
    result = ipset.add_entries("S", sorted(want))
    assert result.ok and result.done == want
    assert result.messages == 1000 and 1 < result.round_trips < 100
    assert ipset.list_entries("S") == want
    assert ipset.delete_entries("S", want).done == want
    assert ipset.list_entries("S") == set()


def test_batch_checks_every_entry_before_sending(ipset: IpsetVerbs) -> None:
    ipset.create("S", "hash:ip,port")
    ipset.create("S6", "hash:ip", "ipv6")
    with pytest.raises(IpsetError) as err:
        ipset.add_entries("S", ["10.0.0.1,tcp:80", "nonsense"])
    assert (err.value.errno, err.value.entry) == (errno.EINVAL, "nonsense")
    with pytest.raises(IpsetError) as err:
        ipset.add_entries("S6", ["10.0.0.1"])
    assert err.value.errno == errno.EINVAL
    assert ipset.list_entries("S") == set()
    with pytest.raises(IpsetError) as err:
        ipset.add_entries("missing", ["10.0.0.1"])
    assert err.value.errno == errno.ENOENT


# --- many sets at once --------------------------------------------------------------------

_SPECS: list[tuple[str, Any, Any]] = [
    ("A", "hash:ip", "ipv4"),
    ("B", "hash:ip,port", "ipv6"),
    ("C", "hash:ip,port,ip", "ipv4"),
    ("D", "hash:ip,port,net", "ipv6"),
    ("E", "bitmap:port", "ipv4"),
]
_ONE_ENTRY = {
    "A": "10.0.0.1",
    "B": "fd00::1,tcp:80",
    "C": "10.0.0.1,tcp:80,10.0.0.1",
    "D": "fd00::4,tcp:80,fd00:1::/64",
    "E": "30080",
}


def _round_trips(ipset: IpsetVerbs) -> int:
    assert isinstance(ipset, (FakeIpset, InNetns))
    return ipset.round_trips


def test_create_many_every_type(ipset: IpsetVerbs) -> None:
    first = ipset.create_many(_SPECS)
    assert first.ok and first.done == {"A", "B", "C", "D", "E"}
    # The handle's first batch also asks the kernel for the five types' revisions.
    assert (first.messages, first.round_trips) == (5 + 5, 2)
    assert ipset.list_sets() == {
        name: SetInfo(t, None if t == "bitmap:port" else f) for name, t, f in _SPECS
    }
    ipset.add_entries("B", ["fd00::1,tcp:80"]).raise_for_failures()
    again = ipset.create_many(_SPECS)  # -exist: keeps the members
    assert again.ok and again.done == {"A", "B", "C", "D", "E"}
    assert (again.messages, again.round_trips) == (5, 1)
    assert ipset.list_entries("B") == {"fd00::1,tcp:80"}
    for name, entry in _ONE_ENTRY.items():  # each set takes its family's entries
        assert ipset.add_entries(name, [entry]).ok, name


def test_create_many_is_one_round_trip_for_a_whole_mode(ipset: IpsetVerbs) -> None:
    ipset.create_many([("WARM", "hash:ip", "ipv4")]).raise_for_failures()
    types: list[Any] = ["hash:ip", "hash:ip,port", "hash:ip,port,ip", "hash:ip,port,net"]
    specs: list[tuple[str, Any, Any]] = [(f"KUBE-{i}", types[i % 4], "ipv4") for i in range(16)]
    result = ipset.create_many([*specs, ("KUBE-NODE-PORT-TCP", "bitmap:port", "ipv4")])
    assert result.ok and len(result.done) == 17
    assert (result.messages, result.round_trips) == (17, 1)


def test_create_many_conflict_fails_alone(ipset: IpsetVerbs) -> None:
    ipset.create("B", "hash:ip")
    ipset.add_entry("B", "10.0.0.1")
    result = ipset.create_many([("A", "hash:ip,port", "ipv4"), ("B", "hash:ip,port", "ipv4"),
                                ("C", "bitmap:port", "ipv4")])  # fmt: skip
    assert result.done == {"A", "C"}
    assert [(f.verb, f.name, f.entry, f.errno) for f in result.failures] == [
        ("create", "B", None, errno.EEXIST)  # as create: the kernel's EEXIST, unchanged
    ]
    assert ipset.list_sets() == {
        "A": SetInfo("hash:ip,port", "ipv4"),
        "B": SetInfo("hash:ip", "ipv4"),
        "C": SetInfo("bitmap:port", None),
    }
    assert ipset.list_entries("B") == {"10.0.0.1"}
    with pytest.raises(IpsetError) as err:
        result.raise_for_failures()
    assert err.value.errno == errno.EEXIST


def test_create_many_checks_every_spec_before_sending(ipset: IpsetVerbs) -> None:
    bad_specs: list[list[tuple[str, Any, Any]]] = [
        [("A", "hash:ip", "ipv4"), ("B", "hash:net", "ipv4")],
        [("A", "hash:ip", "ipv4"), ("B", "hash:ip", "inet")],
        [("A", "hash:ip", "ipv4"), ("A", "hash:ip,port", "ipv4")],
    ]
    for bad in bad_specs:
        with pytest.raises(IpsetError) as err:
            ipset.create_many(bad)
        assert err.value.errno == errno.EINVAL
    assert ipset.list_sets() == {}
    nothing = ipset.create_many([])
    assert nothing.ok and (nothing.done, nothing.messages, nothing.round_trips) == (
        frozenset(),
        0,
        0,
    )


def test_list_all_entries_is_one_dump(ipset: IpsetVerbs) -> None:
    ipset.create_many([*_SPECS, ("EMPTY", "hash:ip,port", "ipv4")]).raise_for_failures()
    big = {f"10.96.{i // 250}.{i % 250},tcp:{1000 + i}" for i in range(2500)}
    ipset.create("BIG", "hash:ip,port")
    ipset.add_entries("BIG", sorted(big)).raise_for_failures()  # spans several dump messages
    want = {
        "A": {"10.0.0.1", "10.0.0.2"},
        "B": {"fd00::1,tcp:80", "fd00::1,sctp:9"},
        "C": {"10.0.0.1,tcp:80,10.0.0.1", "10.0.0.2,udp:53,10.0.0.9"},
        "D": {"fd00::4,tcp:80,fd00:1::/64", "fd00::5,udp:53,fd00:2::/48"},
        "E": {"0", "30080", "65535"},
    }
    for name, entries in want.items():
        ipset.add_entries(name, sorted(entries)).raise_for_failures()
    trips = _round_trips(ipset)
    got = ipset.list_all_entries()
    assert _round_trips(ipset) - trips == 1
    assert got == {**want, "EMPTY": set(), "BIG": big}
    for name, members in got.items():
        assert ipset.list_entries(name) == members, name


def test_list_all_entries_without_sets(ipset: IpsetVerbs) -> None:
    assert ipset.list_all_entries() == {}


def test_destroy(ipset: IpsetVerbs) -> None:
    ipset.create("A", "bitmap:port")
    ipset.create("B", "hash:ip", "ipv6")
    ipset.destroy("A")
    assert set(ipset.list_sets()) == {"B"}


def test_closed_handle_errors(ipset: IpsetVerbs) -> None:
    ipset.close()
    with pytest.raises(IpsetError) as err:
        ipset.list_sets()
    assert err.value.errno == errno.EBADF


# Real kernel only: the ipset command is the witness, so there is no fake side.
@pytest.mark.parametrize("env", [pytest.param("kernel", marks=pytest.mark.netns)], indirect=True)
def test_the_ipset_command_sees_upstream_strings(
    env: tuple[IpsetVerbs, Netns | None],
) -> None:
    ipset, ns = env
    require_commands("ipset")
    assert ns is not None
    ipset.create("KUBE-LOOP-BACK", "hash:ip,port,ip")
    ipset.create("KUBE-NODE-PORT-TCP", "bitmap:port")
    ipset.add_entry("KUBE-LOOP-BACK", "10.244.1.5,tcp:8080,10.244.1.5")
    ipset.add_entry("KUBE-NODE-PORT-TCP", "30080")
    assert _cli_members(ns, "KUBE-LOOP-BACK") == {"10.244.1.5,tcp:8080,10.244.1.5"}
    assert _cli_members(ns, "KUBE-NODE-PORT-TCP") == {"30080"}
    header = ns.run(["ipset", "list", "-t", "KUBE-LOOP-BACK"]).stdout
    assert "family inet hashsize 1024 maxelem 65536" in header
    assert "range 0-65535" in ns.run(["ipset", "list", "-t", "KUBE-NODE-PORT-TCP"]).stdout
    # and entries the command adds are read back in the same strings
    ns.run(["ipset", "add", "KUBE-LOOP-BACK", "10.244.1.6,udp:53,10.244.1.6"])
    assert ipset.list_entries("KUBE-LOOP-BACK") == {
        "10.244.1.5,tcp:8080,10.244.1.5",
        "10.244.1.6,udp:53,10.244.1.6",
    }


@pytest.mark.parametrize("env", [pytest.param("kernel", marks=pytest.mark.netns)], indirect=True)
def test_create_many_makes_the_sets_create_makes(env: tuple[IpsetVerbs, Netns | None]) -> None:
    ipset, ns = env
    require_commands("ipset")
    assert ns is not None
    for i, (_, set_type, family) in enumerate(_SPECS):
        ipset.create(f"ONE{i}", set_type, family)
    ipset.create_many([(f"MANY{i}", t, f) for i, (_, t, f) in enumerate(_SPECS)])
    for i in range(len(_SPECS)):
        one, many = (_cli_header(ns, f"{prefix}{i}") for prefix in ("ONE", "MANY"))
        assert one == many, (one, many)
    assert "family inet6 hashsize 1024 maxelem 65536" in _cli_header(ns, "MANY1")
    assert "range 0-65535" in _cli_header(ns, "MANY4")


@pytest.mark.parametrize("env", [pytest.param("kernel", marks=pytest.mark.netns)], indirect=True)
def test_list_all_entries_skips_other_types(env: tuple[IpsetVerbs, Netns | None]) -> None:
    ipset, ns = env
    require_commands("ipset")
    assert ns is not None
    ns.run(["ipset", "create", "OTHER", "hash:net"])
    ns.run(["ipset", "add", "OTHER", "10.0.0.0/8"])
    ns.run(["ipset", "create", "MINE", "hash:ip,port"])
    ns.run(["ipset", "add", "MINE", "10.0.0.1,udp:53"])
    assert ipset.list_all_entries() == {"MINE": {"10.0.0.1,udp:53"}}
    assert ipset.add_entries("MINE", ["10.0.0.2,tcp:80"]).ok


def _cli_header(ns: Netns, name: str) -> str:
    """``ipset list -t`` without the lines that differ between two equal sets."""
    lines = ns.run(["ipset", "list", "-t", name]).stdout.splitlines()
    keep = (line for line in lines if not line.startswith(("Name:", "Size in memory:")))
    return "\n".join(re.sub(r" initval 0x[0-9a-f]+", "", line) for line in keep)


# --- entry strings (no kernel) ------------------------------------------------------------


def test_canonical_entry_forms() -> None:
    assert canonical_entry("hash:ip,port", "10.96.0.10,UDP:53") == "10.96.0.10,udp:53"
    assert canonical_entry("hash:ip,port,net", "1.2.3.4,tcp:80,10.1.2.3/8") == (
        "1.2.3.4,tcp:80,10.0.0.0/8"
    )
    assert canonical_entry("bitmap:port", "0030080") == "30080"
    with pytest.raises(ValueError):
        canonical_entry("hash:ip", "10.0.0.1", "ipv6")


def test_error_is_picklable_and_names_its_input() -> None:
    import pickle

    e = IpsetError("add", "S", "10.0.0.1,tcp:80", ERR_EXIST, "already")
    again = pickle.loads(pickle.dumps(e))
    assert (again.verb, again.name, again.entry, again.errno) == (
        "add",
        "S",
        "10.0.0.1,tcp:80",
        ERR_EXIST,
    )
    assert str(again) == "ipset add S 10.0.0.1,tcp:80: already (errno 4103)"


# --- the batch encoder's fast path, against the general one (no kernel) -----------------


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([("hash:ip", "ipv4"), ("hash:ip,port", "ipv4"), ("hash:ip", "ipv6")]),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["tcp", "udp", "sctp", "TCP", "icmp"]),
    st.sampled_from(["80", "0", "65535", "65536", "080", "", "x", "443"]),
    st.sampled_from(["", "0", " ", "x"]),  # spellings the fast path must hand over
    st.booleans(),
)
def test_the_fast_entry_encoder_writes_what_encode_adt_writes(
    kind: tuple[Any, Any], n: int, proto: str, port: str, junk: str, exclusive: bool
) -> None:
    set_type, family = kind
    ip = str(ipaddress.IPv4Address(n))
    text = f"{junk}{ip}" if set_type == "hash:ip" else f"{junk}{ip},{proto}:{port}"
    info = SetInfo(set_type, family)
    encoder = AdtEncoder(8, "KUBE-CLUSTER-IP", info, exclusive)
    fast = encoder.fast(text)
    try:
        parsed = parse_entry(set_type, text, family)
    except ValueError:
        assert fast is None  # malformed: left to the general parser, which refuses it
        return
    if fast is None:  # not canonical: the general path canonicalises it
        assert canonical_entry(set_type, text, family) != text or family == "ipv6"
        return
    assert canonical_entry(set_type, text, family) == text
    assert encoder.message(fast, 9) == encode_adt(8, "KUBE-CLUSTER-IP", info, parsed, 9, exclusive)
