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
import multiprocessing
import multiprocessing.connection
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.kernel.fakes.ipset import FakeIpset
from kproxy.kernel.ipset import (
    ERR_EXIST,
    Ipset,
    IpsetBatchResult,
    IpsetError,
    IpsetVerbs,
    SetInfo,
    canonical_entry,
)
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
            conn.send(("ok", getattr(handle, method)(*args)))
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
