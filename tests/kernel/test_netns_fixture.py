"""The ``netns`` fixture: namespaces are made, linked, and gone afterwards."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.netns import PREFIX, Netns, NetnsFactory, list_netns

pytestmark = pytest.mark.netns

SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(1)
    s.settimeout(20)
    print("ready", flush=True)
    c, _ = s.accept()
    c.sendall(b"hello " + c.recv(64))
    c.close()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(b"from-client")
    print(c.recv(64).decode())
""")


def _serve(ns: Netns, addr: str, port: int) -> subprocess.Popen[str]:
    """A one-shot TCP echo server in ``ns``, returned once it listens."""
    p = ns.popen([sys.executable, "-c", SERVER, addr, str(port)])
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_namespace_created_with_lo_up(netns: NetnsFactory) -> None:
    ns = netns()
    assert ns.name.startswith(PREFIX)
    assert ns.name in list_netns()
    out = ns.run(["ip", "-o", "link", "show", "lo"]).stdout
    assert "UP" in out.split("<", 1)[1].split(">", 1)[0]
    # Two namespaces never share a name.
    assert netns().name != ns.name


def test_veth_link_carries_tcp(netns: NetnsFactory) -> None:
    a, b = netns(), netns()
    if_a, if_b = netns.link(a, b, addr_a="10.231.0.1/24", addr_b="10.231.0.2/24")
    assert if_a in a.run(["ip", "-o", "link"]).stdout
    assert "10.231.0.2/24" in b.run(["ip", "-o", "addr", "show", if_b]).stdout
    server = _serve(b, "10.231.0.2", 8080)
    out = a.run([sys.executable, "-c", CLIENT, "10.231.0.2", "8080"]).stdout
    assert out.strip() == "hello from-client"
    server.wait(timeout=10)


def test_bridge_in_another_namespace_connects_two(netns: NetnsFactory) -> None:
    hub, a, b = netns(), netns(), netns()
    br = netns.bridge(hub, addr="10.232.0.254/24")
    netns.attach(a, hub, br, addr="10.232.0.1/24")
    netns.attach(b, hub, br, addr="10.232.0.2/24")
    _serve(b, "10.232.0.2", 9090)
    out = a.run([sys.executable, "-c", CLIENT, "10.232.0.2", "9090"]).stdout
    assert out.strip() == "hello from-client"
    # The bridge's own address is reachable too (the hub is a real L3 peer).
    _serve(hub, "10.232.0.254", 9091)
    out = a.run([sys.executable, "-c", CLIENT, "10.232.0.254", "9091"]).stdout
    assert out.strip() == "hello from-client"


def test_gone_afterwards_even_on_failure() -> None:
    names: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    with pytest.raises(RuntimeError, match="boom"), NetnsFactory() as factory:
        a, b = factory(), factory()
        factory.link(a, b, addr_a="10.233.0.1/30", addr_b="10.233.0.2/30")
        names += [a.name, b.name]
        procs.append(a.popen(["sleep", "300"]))
        # A grandchild in its own session escapes the process group: swept by pid.
        b.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 &"])
        assert b.pids()
        raise RuntimeError("boom")
    assert not set(names) & list_netns()
    assert all(p.poll() is not None for p in procs)
