"""Network-namespace fixtures for the netns tier.

Owns the throwaway network namespaces tests run real kernel code in. The
``netns`` fixture is a :class:`NetnsFactory`: call it for a namespace, ask it for
veth links (namespace to namespace, or namespace to a bridge that lives in another
namespace) with addresses.

Invariants:

- Every namespace is named ``kpt-<pid>-<random>``, so parallel sessions (and the
  other tiers on this machine) never collide, and only its creator deletes it.
- Nothing is ever created in the root namespace: veth pairs are made with
  ``ip -n A link add ... peer ... netns B``, so both ends are born inside test
  namespaces and vanish with them.
- At teardown, even when the test failed, every process started through
  :meth:`Netns.popen` is killed (its whole process group), then any process still
  inside a namespace, then the namespace is deleted and checked gone; cleanup
  problems are raised only after everything was attempted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, TypeVar

import pytest

from tests.support.tiers import require_commands, require_root

__all__ = ["PREFIX", "Netns", "NetnsCleanupError", "NetnsFactory", "netns"]

PREFIX = "kpt-"
_TIMEOUT_S = 30.0
T = TypeVar("T")


class NetnsCleanupError(RuntimeError):
    """A namespace or process outlived its test."""


def _call_child(conn: Connection, ns: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    from kproxy.kernel.podnet import enter_netns

    try:
        enter_netns(ns)  # the forked child is single-threaded: the whole process moves
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # sent back and re-raised in the test
        conn.send(("err", f"{type(e).__name__}: {e}"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=False, timeout=_TIMEOUT_S
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def list_netns() -> set[str]:
    """Names of all network namespaces in /run/netns (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass
class Netns:
    """One test network namespace; run commands inside it by name."""

    name: str
    _procs: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)
    _next_if: int = field(default=0, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = _TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to completion (text, captured)."""
        proc = subprocess.run(
            self.argv(argv),
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode, proc.args, proc.stdout, proc.stderr
            )
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside the namespace; it is killed at teardown if still alive."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        # Its own process group, so teardown can kill whatever it spawned as well.
        p: subprocess.Popen[str] = subprocess.Popen(
            self.argv(argv), start_new_session=True, **kwargs
        )
        self._procs.append(p)
        return p

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 120.0) -> T:
        """``fn(*args)`` in a forked child that joined the namespace (kernel tables such
        as IPVS are per namespace); forking spares a Python start, which costs seconds
        under emulation.  ``fn``'s exception comes back as an AssertionError."""
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_call_child, args=(child, self.name, fn, args), daemon=True)
        proc.start()
        try:
            assert parent.poll(timeout), f"{fn.__name__} did not finish in {timeout} s"
            status, value = parent.recv()
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if status == "err":
            raise AssertionError(f"{fn.__name__} in {self.name}: {value}")
        return value  # type: ignore[no-any-return]

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS`` (raises on failure)."""
        return _ip("-n", self.name, *args)

    def set_up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def add_addr(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", ifname)

    def new_ifname(self, stem: str = "veth") -> str:
        name = f"{stem}{self._next_if}"
        self._next_if += 1
        return name

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_all(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        # Anything else the test left running in here (e.g. a daemonised child).
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class NetnsFactory:
    """Creates namespaces and links on request; :meth:`cleanup` removes them all."""

    def __init__(self) -> None:
        self._tag = f"{PREFIX}{os.getpid()}-"
        self.namespaces: list[Netns] = []

    def __call__(self, *, lo: bool = True) -> Netns:
        name = f"{self._tag}{secrets.token_hex(3)}"
        _ip("netns", "add", name)
        ns = Netns(name)
        self.namespaces.append(ns)
        if lo:
            ns.set_up("lo")
        return ns

    def link(
        self,
        a: Netns,
        b: Netns,
        *,
        addr_a: str | None = None,
        addr_b: str | None = None,
        ifname_a: str | None = None,
        ifname_b: str | None = None,
        up: bool = True,
    ) -> tuple[str, str]:
        """A veth pair from ``a`` to ``b``; returns the two interface names."""
        if_a, if_b = ifname_a or a.new_ifname(), ifname_b or b.new_ifname()
        _ip(
            "-n", a.name, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", b.name
        )
        for ns, ifname, addr in ((a, if_a, addr_a), (b, if_b, addr_b)):
            if addr is not None:
                ns.add_addr(ifname, addr)
            if up:
                ns.set_up(ifname)
        return if_a, if_b

    def bridge(self, ns: Netns, name: str = "br0", *, addr: str | None = None) -> str:
        """A bridge inside ``ns`` (up), optionally with an address."""
        ns.ip("link", "add", name, "type", "bridge")
        if addr is not None:
            ns.add_addr(name, addr)
        ns.set_up(name)
        return name

    def attach(
        self,
        ns: Netns,
        bridge_ns: Netns,
        bridge: str,
        *,
        addr: str | None = None,
        ifname: str | None = None,
    ) -> str:
        """Link ``ns`` to ``bridge`` in ``bridge_ns``; returns the interface name in ``ns``."""
        inner, port = self.link(
            ns, bridge_ns, addr_a=addr, ifname_a=ifname, ifname_b=bridge_ns.new_ifname("port")
        )
        bridge_ns.ip("link", "set", port, "master", bridge)
        return inner

    def cleanup(self) -> None:
        """Kill processes and delete namespaces; raise afterwards if anything survived."""
        problems: list[str] = []
        for ns in reversed(self.namespaces):
            try:
                ns.kill_all()
            except Exception as e:  # keep going: the namespace must still be deleted
                problems.append(f"{ns.name}: killing processes: {e}")
            proc = _ip("netns", "del", ns.name, check=False)
            if proc.returncode != 0:
                problems.append(f"{ns.name}: ip netns del: {proc.stderr.strip()}")
        left = list_netns() & {ns.name for ns in self.namespaces}
        self.namespaces.clear()
        if left:
            problems.append(f"namespaces still present: {sorted(left)}")
        if problems:
            raise NetnsCleanupError("; ".join(problems))

    def __enter__(self) -> NetnsFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@pytest.fixture
def netns() -> Iterator[NetnsFactory]:
    """Factory of throwaway network namespaces (tier netns: root and ``ip`` needed)."""
    require_root()
    require_commands("ip")
    with NetnsFactory() as factory:
        yield factory
