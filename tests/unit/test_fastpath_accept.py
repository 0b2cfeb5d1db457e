"""Accepting and dialling inside the relay loop (compiled and twin), on 127.0.0.1.

The same scenarios run against both builds (parity): round robin over the
backends with half-close, a reset at once without backends, a dead backend
skipped, every backend dead → reset after the retries, a backend that never
answers skipped after its dial timeout, endpoint changes applying to new
connections only, ``unlisten`` and fd hygiene (counted in /proc/self/fd) over a
few hundred connections. Timeouts and loops are bounded.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.support.impls import IMPLS

FAST_DIALS = (0.2, 0.2, 0.2, 0.2)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Events:
    """Collects on_event reports from the relay thread."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int]] = []
        self.cond = threading.Condition()

    def __call__(self, lid: int, kind: int, err: int) -> None:
        with self.cond:
            self.items.append((lid, kind, err))
            self.cond.notify_all()

    def count(self, kind: int) -> int:
        with self.cond:
            return sum(1 for _, k, _ in self.items if k == kind)

    def wait(self, kind: int, n: int, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(
                lambda: sum(1 for _, k, _ in self.items if k == kind) >= n, timeout
            ), self.items


class Backend:
    """Answers ``<name> <bytes read>`` after the client's half-close, then closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self._stop = False
        self.conns = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns += 1
            with conn:
                conn.settimeout(5)
                n = 0
                try:
                    while chunk := conn.recv(65536):
                        n += len(chunk)
                    conn.sendall(f"{self.name} {n}".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    return port


def request(port: int, payload: bytes = b"hello") -> str:
    """Send, half-close, read the reply to EOF; 'reset' when the proxy resets us."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except OSError as e:
        if e.errno != errno.ENOTCONN:  # the reset raced our shutdown()
            raise
        return "reset"
    return out.decode() if out else "eof"


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    bs = [Backend("b0"), Backend("b1")]
    yield bs
    for b in bs:
        b.close()


class Proxy:
    """A RelayLoop with one listener handed over."""

    def __init__(self, impl: ModuleType, **kw: Any) -> None:
        self.events = Events()
        self.loop = impl.RelayLoop(
            lambda *a: None, on_event=self.events, dial_timeouts=FAST_DIALS, **kw
        )
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(512)
        self.port: int = lst.getsockname()[1]
        self.loop.listen(lst.detach(), 7)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 5
        while self.loop.stats()["accepted_active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.loop.stats()["accepted_active"] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_round_robin_half_close_and_large_request(
    impl: ModuleType, backends: list[Backend]
) -> None:
    p = Proxy(impl)
    try:
        p.loop.set_backends(7, [("127.0.0.1", b.port) for b in backends])
        big = b"z" * (4 << 20)
        assert request(p.port, big) == f"b0 {len(big)}"
        assert request(p.port) == "b1 5"
        assert request(p.port) == "b0 5"
        p.wait_idle()
        st = p.loop.stats()
        assert st["accepted"] == 3 and st["refused"] == 0 and st["dial_failures"] == 0
    finally:
        p.loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_no_backends_resets_at_once(impl: ModuleType) -> None:
    p = Proxy(impl)
    try:
        t0 = time.monotonic()
        assert request(p.port) in ("reset", "eof")
        assert time.monotonic() - t0 < 1.0
        p.events.wait(impl.RelayLoop.EV_REFUSED, 1)
        p.loop.set_backends(7, [])
        assert request(p.port) in ("reset", "eof")
        p.events.wait(impl.RelayLoop.EV_REFUSED, 2)
        assert p.loop.stats()["refused"] == 2
    finally:
        p.loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_dead_backend_is_skipped(impl: ModuleType, backends: list[Backend]) -> None:
    p = Proxy(impl)
    try:
        p.loop.set_backends(7, [("127.0.0.1", dead_port()), ("127.0.0.1", backends[1].port)])
        for _ in range(4):
            assert request(p.port) == "b1 5"
        p.events.wait(impl.RelayLoop.EV_DIAL_FAILED, 2)
        assert p.loop.stats()["refused"] == 0
    finally:
        p.loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_dead_resets_after_every_attempt(impl: ModuleType) -> None:
    p = Proxy(impl)
    try:
        p.loop.set_backends(7, [("127.0.0.1", dead_port())])
        assert request(p.port) in ("reset", "eof")
        p.events.wait(impl.RelayLoop.EV_REFUSED, 1)
        assert p.events.count(impl.RelayLoop.EV_DIAL_FAILED) == len(FAST_DIALS)
        p.wait_idle()
    finally:
        p.loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_silent_backend_times_out_and_the_next_one_answers(
    impl: ModuleType, backends: list[Backend]
) -> None:
    # A listener that never accepts, its queue full: SYNs are dropped, connect hangs.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
            fillers.append(f)
        time.sleep(0.1)
        p = Proxy(impl)
        try:
            p.loop.set_backends(
                7, [("127.0.0.1", silent.getsockname()[1]), ("127.0.0.1", backends[0].port)]
            )
            t0 = time.monotonic()
            assert request(p.port) == "b0 5"
            assert 0.15 <= time.monotonic() - t0 < 2.0
            p.events.wait(impl.RelayLoop.EV_DIAL_FAILED, 1)
            assert 110 in [e for _, k, e in p.events.items]  # ETIMEDOUT
        finally:
            p.loop.close()
    finally:
        for f in fillers:
            f.close()
        silent.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_endpoint_change_applies_to_new_connections(
    impl: ModuleType, backends: list[Backend]
) -> None:
    p = Proxy(impl)
    try:
        p.loop.set_backends(7, [("127.0.0.1", backends[0].port)])
        assert request(p.port) == "b0 5"
        # A connection open across the change stays on its backend.
        held = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        held.sendall(b"abc")
        # Relaying (so past the accept batch that took it) before the change: a
        # client accepted in that same batch would still get the old list.
        deadline = time.monotonic() + 5
        while p.loop.stats()["bytes"] < 5 + 4 + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        p.loop.set_backends(7, [("127.0.0.1", backends[1].port)])
        assert request(p.port) == "b1 5"
        held.shutdown(socket.SHUT_WR)
        assert held.recv(100) == b"b0 3"
        held.close()
    finally:
        p.loop.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_unlisten_and_no_fd_leak(impl: ModuleType, backends: list[Backend]) -> None:
    gc.collect()  # sockets of earlier tests must not close during this one
    before = _fds()
    p = Proxy(impl)
    p.loop.set_backends(7, [("127.0.0.1", b.port) for b in backends])
    got = [request(p.port) for _ in range(300)]
    assert got.count("b0 5") == 150 and got.count("b1 5") == 150
    p.wait_idle()
    p.loop.unlisten(7)
    deadline = time.monotonic() + 5
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
            time.sleep(0.01)
        except ConnectionRefusedError:
            refused = True
        except ConnectionResetError:
            time.sleep(0.01)  # accepted just before the listener went away
    assert refused
    p.loop.close()
    gc.collect()
    assert _fds() <= before


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_backend_address_is_rejected(impl: ModuleType) -> None:
    p = Proxy(impl)
    try:
        with pytest.raises(ValueError):
            p.loop.set_backends(7, [("not-an-ip", 80)])
        with pytest.raises(ValueError):
            p.loop.set_backends(7, [("127.0.0.1", 0)])
    finally:
        p.loop.close()
