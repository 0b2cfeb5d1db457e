"""The relay loop (compiled and twin) and its ``Relay`` adapter, on 127.0.0.1 sockets.

Every test builds client → [relay] → backend pairs out of loopback TCP
connections it made itself: a 100 MiB transfer keeps its checksum, a half-close
lets the reply through, errors reset both legs, many pairs run at once, and no
fd outlives the loop (counted in /proc/self/fd). Both the splice path and the
copy path (``force_copy``) run for both builds. Loops and sizes are bounded.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from kproxy.proxy.userspace.splice import SpliceRelay
from tests.support.impls import IMPLS

MODES = [pytest.param(False, id="splice"), pytest.param(True, id="copy")]
MiB = 1024 * 1024


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Done:
    """Collects on_done reports from the relay thread."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int, int]] = []
        self.cond = threading.Condition()

    def __call__(self, cid: int, up: int, down: int, err: int) -> None:
        with self.cond:
            self.items.append((cid, up, down, err))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[int, int, int, int]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0), backlog=512)
    yield lst
    lst.close()


def _pair(lst: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (outer end, inner end)."""
    outer = socket.create_connection(lst.getsockname())
    inner, _ = lst.accept()
    return outer, inner


def _relayed(loop: object, lst: socket.socket, cid: int) -> tuple[socket.socket, socket.socket]:
    """client ⇄ [loop] ⇄ backend; returns (client end, backend's server end)."""
    client, proxy_in = _pair(lst)
    proxy_out, server = _pair(lst)
    loop.add(proxy_in.detach(), proxy_out.detach(), cid)  # type: ignore[attr-defined]
    return client, server


def _recv_all(sock: socket.socket, limit: int = 512 * MiB) -> bytes:
    chunks = []
    total = 0
    while total <= limit:
        b = sock.recv(1 << 20)
        if not b:
            break
        chunks.append(b)
        total += len(b)
    return b"".join(chunks)


@pytest.mark.parametrize("force_copy", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_100mib_integrity_and_half_close(
    impl: ModuleType, force_copy: bool, listener: socket.socket
) -> None:
    before = _fds()
    done = Done()
    loop = impl.RelayLoop(done, force_copy=force_copy)
    client, server = _relayed(loop, listener, 1)
    size = 100 * MiB
    sent = hashlib.sha256()

    def send() -> None:
        block = os.urandom(MiB)
        for i in range(size // MiB):
            chunk = block[i:] + block[:i]  # every MiB differs
            client.sendall(chunk)
            sent.update(chunk)
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = hashlib.sha256()
    n = 0
    server.settimeout(60)
    while n <= size:
        b = server.recv(1 << 20)
        if not b:
            break
        got.update(b)
        n += len(b)
    sender.join(60)
    assert n == size and got.digest() == sent.digest()
    # The client half-closed; the other direction still flows and then ends.
    server.sendall(b"reply after your FIN")
    server.shutdown(socket.SHUT_WR)
    client.settimeout(10)
    assert _recv_all(client) == b"reply after your FIN"
    assert done.wait(1) == [(1, size, 20, 0)]
    stats = loop.stats()
    assert stats["active"] == 0 and stats["finished"] == 1 and stats["bytes"] == size + 20
    client.close()
    server.close()
    loop.close()
    loop.close()  # idempotent
    assert _fds() == before


@pytest.mark.parametrize("force_copy", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_many_concurrent_pairs(impl: ModuleType, force_copy: bool, listener: socket.socket) -> None:
    before = _fds()
    done = Done()
    loop = impl.RelayLoop(done, force_copy=force_copy, max_pooled_pipes=16)
    pairs = [_relayed(loop, listener, i) for i in range(150)]
    for i, (client, _) in enumerate(pairs):
        client.sendall(struct.pack("!I", i) * (1 + i * 37))
        client.shutdown(socket.SHUT_WR)
    for i, (_, server) in enumerate(pairs):
        server.settimeout(10)
        data = _recv_all(server)
        assert data == struct.pack("!I", i) * (1 + i * 37)
        server.sendall(data[::-1])
        server.shutdown(socket.SHUT_WR)
    for i, (client, _) in enumerate(pairs):
        client.settimeout(10)
        assert _recv_all(client) == (struct.pack("!I", i) * (1 + i * 37))[::-1]
    reports = sorted(done.wait(150))
    assert [r[0] for r in reports] == list(range(150))
    assert all(r[3] == 0 and r[1] == r[2] == 4 * (1 + r[0] * 37) for r in reports)
    assert loop.stats()["pooled_pipes"] <= 16
    for client, server in pairs:
        client.close()
        server.close()
    loop.close()
    assert _fds() == before


@pytest.mark.parametrize("force_copy", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_reset_propagates(impl: ModuleType, force_copy: bool, listener: socket.socket) -> None:
    before = _fds()
    done = Done()
    loop = impl.RelayLoop(done, force_copy=force_copy)
    client, server = _relayed(loop, listener, 5)
    client.sendall(b"x")
    server.settimeout(5)
    assert server.recv(1) == b"x"
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # RST towards the relay
    (cid, up, _, err) = done.wait(1)[0]
    assert (cid, up) == (5, 1) and err != 0
    client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        # The relay reset the client leg too (SO_LINGER 0), not a polite FIN.
        for _ in range(3):
            if not client.recv(10):
                break
            time.sleep(0.05)
        client.send(b"more")
        client.recv(10)
    client.close()
    loop.close()
    assert _fds() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_abort_all_and_close(impl: ModuleType, listener: socket.socket) -> None:
    before = _fds()
    done = Done()
    loop = impl.RelayLoop(done)
    pairs = [_relayed(loop, listener, i) for i in range(10)]
    for client, server in pairs:
        client.sendall(b"ping")
        server.settimeout(5)
        assert server.recv(4) == b"ping"
    loop.abort_all()
    reports = done.wait(10)
    assert {r[3] for r in reports} == {errno.ECONNABORTED}
    for client, server in pairs:
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()
        server.close()
    assert loop.stats()["active"] == 0 and loop.stats()["aborted"] == 10
    # close() with pairs still open resets them too, and reports them.
    client, server = _relayed(loop, listener, 99)
    client.sendall(b"x")
    server.settimeout(5)
    assert server.recv(1) == b"x"
    loop.close()
    assert done.wait(11)[-1][0] == 99
    with pytest.raises(RuntimeError):
        loop.add(0, 0, 0)
    client.close()
    server.close()
    assert _fds() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_splice_relay_adapter(impl: ModuleType, listener: socket.socket) -> None:
    before = _fds()
    relay = SpliceRelay(loop_factory=impl.RelayLoop)
    client, proxy_in = _pair(listener)
    proxy_out, server = _pair(listener)
    proxy_in.setblocking(False)
    proxy_out.setblocking(False)
    relay.start(proxy_in, proxy_out)
    assert relay.active == 1
    assert proxy_in.fileno() == -1 and proxy_out.fileno() == -1  # ownership moved
    client.sendall(b"hello")
    client.shutdown(socket.SHUT_WR)
    server.settimeout(5)
    assert _recv_all(server) == b"hello"
    server.sendall(b"world")
    server.close()
    client.settimeout(5)
    assert _recv_all(client) == b"world"
    deadline = time.monotonic() + 5
    while relay.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.active == 0 and relay.finished == 1
    assert (relay.bytes_up, relay.bytes_down) == (5, 5)
    client.close()
    relay.close()
    # After close, start() refuses by resetting the pair instead of leaking it.
    a, b = _pair(listener)
    c, d = _pair(listener)
    relay.start(b, c)
    assert b.fileno() == -1 and c.fileno() == -1
    for s in (a, d):
        s.close()
    assert _fds() == before
