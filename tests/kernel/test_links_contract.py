"""One contract for ``kube-ipvs0`` and local addresses: the fake and the real kernel.

The real side needs ``dummy`` links, which this host's kernel lacks, so it is
marked ``vm`` and runs inside the guest, in a namespace of its own; the node's
other interfaces there are a second dummy link with addresses.  On the host, a
netns-tier test drives the address verbs on a veth named ``kube-ipvs0`` (every
verb but creation works on any link kind).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address

import pytest

from kproxy.kernel.fakes.links import FakeLinks
from kproxy.kernel.links import DUMMY_LINK, Links, LinksError, LinksVerbs
from tests.support.netns import Netns, NetnsFactory

VIP = ip_address("10.96.0.10")
VIP2 = ip_address("10.96.0.11")
VIP6 = ip_address("fd00:96::10")
NODE = ip_address("192.168.50.2")
NODE6 = ip_address("fd00:50::2")
LINK_LOCAL6 = ip_address("fe80::50:2")


@dataclass
class Env:
    links: LinksVerbs
    add_node_addresses: Callable[[], None]  # NODE/24, NODE6/64, LINK_LOCAL6/64 on another link
    link_state: Callable[[], str]  # "DOWN"/"UP" as `ip link` shows it ("" for the fake)


def _fake_env() -> Env:
    fake = FakeLinks()

    def add() -> None:
        fake.state.node_addresses |= {NODE, NODE6, LINK_LOCAL6, ip_address("127.0.0.1")}

    return Env(fake, add, lambda: "")


def _real_env(ns: Netns, links: Links) -> Env:
    def add() -> None:
        ns.ip("link", "add", "node0", "type", "dummy")
        ns.ip("link", "set", "node0", "up")
        for cidr in (f"{NODE}/24", f"{NODE6}/64", f"{LINK_LOCAL6}/64"):
            ns.ip("addr", "add", cidr, "dev", "node0", *(["nodad"] if ":" in cidr else []))

    def state() -> str:
        out = ns.ip("-o", "link", "show", DUMMY_LINK).stdout
        return "UP" if ",UP" in out or "<UP" in out else "DOWN"

    return Env(links, add, state)


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.vm)])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "fake":
        e = _fake_env()
        yield e
        e.links.close()
        return
    assert os.environ.get("KPROXY_IN_VM") == "1", "dummy links only inside the VM"
    factory: NetnsFactory = request.getfixturevalue("netns")
    ns = factory()
    links = Links(netns=ns.name)
    try:
        yield _real_env(ns, links)
    finally:
        links.close()


def test_ensure_creates_a_down_link_once(env: Env) -> None:
    links = env.links
    assert not links.link_exists()
    assert links.ensure_link() is True
    assert links.ensure_link() is False
    assert links.link_exists()
    assert env.link_state() in ("", "DOWN")  # upstream never sets it up


def test_addresses_round_trip_as_host_prefixes(env: Env) -> None:
    links = env.links
    links.ensure_link()
    assert links.add_address(VIP) is True
    assert links.add_address(VIP) is False  # already bound: tolerated
    assert links.add_address(VIP2) is True
    assert links.add_address(VIP6) is True
    assert links.list_addresses("ipv4") == {VIP, VIP2}
    assert links.list_addresses("ipv6") == {VIP6}
    assert links.delete_address(VIP) is True
    assert links.delete_address(VIP) is False  # not bound: tolerated
    assert links.list_addresses("ipv4") == {VIP2}


def test_local_addresses_leave_out_the_link_loopback_and_link_local(env: Env) -> None:
    links = env.links
    links.ensure_link()
    links.add_address(VIP)
    links.add_address(VIP6)
    env.add_node_addresses()
    assert links.local_addresses("ipv4") == {NODE}
    assert links.local_addresses("ipv6") == {NODE6}


def test_verbs_on_a_missing_link(env: Env) -> None:
    links = env.links
    for call in (
        lambda: links.add_address(VIP),
        lambda: links.delete_address(VIP),
        lambda: links.list_addresses("ipv4"),
    ):
        with pytest.raises(LinksError) as err:
            call()
        assert err.value.errno == errno.ENODEV
        assert err.value.link == DUMMY_LINK
    assert links.delete_link() is False


def test_delete_link_takes_its_addresses(env: Env) -> None:
    links = env.links
    links.ensure_link()
    links.add_address(VIP)
    assert links.delete_link() is True
    assert not links.link_exists()
    links.ensure_link()
    assert links.list_addresses("ipv4") == set()


def test_batch_address_verbs(env: Env) -> None:
    links = env.links
    links.ensure_link()
    links.add_address(VIP)
    many = [ip_address(f"10.97.{i // 250}.{i % 250 + 1}") for i in range(300)]
    result = links.add_addresses([VIP, VIP2, VIP6, *many])
    assert result.ok
    assert result.changed == {VIP2, VIP6, *many}  # VIP was bound already: a no-op
    assert result.messages == 303 and 1 < result.round_trips < 303
    assert links.list_addresses("ipv4") == {VIP, VIP2, *many}
    assert links.list_addresses("ipv6") == {VIP6}
    gone = links.delete_addresses([VIP, VIP6, *many])
    assert gone.ok and gone.changed == {VIP, VIP6, *many}
    again = links.delete_addresses([VIP, VIP2])  # VIP is not bound any more: a no-op
    assert again.ok and again.changed == {VIP2}
    assert links.list_addresses("ipv4") == set()


def test_batch_verbs_on_a_missing_link(env: Env) -> None:
    for verb in (env.links.add_addresses, env.links.delete_addresses):
        with pytest.raises(LinksError) as err:
            verb([VIP])
        assert err.value.errno == errno.ENODEV


def test_closed_handle_errors(env: Env) -> None:
    env.links.close()
    with pytest.raises(LinksError) as err:
        env.links.link_exists()
    assert err.value.errno == errno.EBADF


# --- host netns tier: the address verbs on an existing (veth) link ------------------------


@pytest.mark.netns
def test_address_verbs_on_an_existing_link_in_a_netns(netns: NetnsFactory) -> None:
    node, peer = netns(), netns()
    netns.link(node, peer, addr_a=f"{NODE}/24", ifname_a="eth0", ifname_b="eth0")
    node.ip("link", "add", DUMMY_LINK, "type", "veth", "peer", "name", "kipvs-peer")
    with Links(netns=node.name) as links:
        assert links.ensure_link() is False  # exists: left as it is
        assert links.add_address(VIP) is True
        assert links.add_address(VIP6) is True
        assert links.add_address(VIP) is False
        assert links.list_addresses("ipv4") == {VIP}
        assert f"{VIP}/32" in node.ip("-o", "addr", "show", "dev", DUMMY_LINK).stdout
        assert f"{VIP6}/128" in node.ip("-o", "addr", "show", "dev", DUMMY_LINK).stdout
        assert links.local_addresses("ipv4") == {NODE}
        assert links.delete_address(VIP) is True
        assert links.delete_address(VIP) is False
        assert links.list_addresses("ipv4") == set()
        assert links.delete_link() is True
        assert not links.link_exists()


@pytest.mark.netns
def test_batch_address_verbs_on_an_existing_link_in_a_netns(netns: NetnsFactory) -> None:
    node = netns()
    node.ip("link", "add", DUMMY_LINK, "type", "veth", "peer", "name", "kipvs-peer")
    with Links(netns=node.name) as links:
        result = links.add_addresses([VIP, VIP2, VIP6])
        assert result.ok and result.changed == {VIP, VIP2, VIP6}
        assert (result.messages, result.round_trips) == (3, 1)
        assert links.add_addresses([VIP]).changed == set()
        shown = node.ip("-o", "addr", "show", "dev", DUMMY_LINK).stdout
        assert f"{VIP}/32" in shown and f"{VIP2}/32" in shown and f"{VIP6}/128" in shown
        assert links.delete_addresses([VIP, VIP6]).changed == {VIP, VIP6}
        assert links.list_addresses("ipv4") == {VIP2}


@pytest.mark.netns
def test_missing_netns_is_an_error() -> None:
    with pytest.raises(LinksError):
        Links(netns="kpt-does-not-exist")
