"""Pure-Python twin of accepting and dialling in :mod:`kproxy._fastpath` (``_fastpath_accept.pxi``).

Owns the connection-rate path of :class:`~kproxy._fastpath_relay_py.RelayLoop`
(no Python per connection in the compiled build): its listeners, their
backend round robins, the dial attempts and their timers. Functions of the
loop's state (``self``), run on the relay thread; a connected client is
relayed by :mod:`kproxy._fastpath_splice_py` like an ``add``-ed pair.

Contract, identical in both builds:

- ``listen(fd, listener_id)`` hands over a listening socket (the loop owns that
  fd and closes it on ``unlisten(listener_id)``/``close()``); ``set_backends(
  listener_id, [(ip, port), ...])`` replaces its round robin (applies to
  connections accepted afterwards; one being dialled keeps its list);
- each accepted connection (``accept4`` non-blocking, at most 64 per readiness
  report, level-triggered) gets TCP_NODELAY and a non-blocking connect to the
  next backend; a failed or timed-out attempt (``dial_timeouts``, upstream's
  250 ms, 500 ms, 1 s, 2 s) moves to the following backend; after the last, or
  with no backends, the client is reset (SO_LINGER 0) at once;
- on connect the pair is relayed as if ``add``-ed, but no ``on_done`` is
  reported for it (Python never saw it: ``stats()`` counts it);
- ``EMFILE``/``ENFILE`` on accept pause that listener (``accept_pause``: 50 ms
  doubling to 1 s) instead of spinning; the connection waits in the backlog;
- ``on_event(listener_id, kind, errno)`` (optional) reports ``EV_REFUSED``,
  ``EV_DIAL_FAILED``, ``EV_FD_EXHAUSTED``, ``EV_ACCEPTING`` (accepting again
  after exhaustion) and ``EV_ACCEPT_FAILED`` (the listener was dropped), on the
  relay thread, batched like ``on_done``.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Final

from kproxy._fastpath_splice_py import (
    _ET_EVENTS,
    _Conn,
    _finish,
    _linger_zero,
    _pipe_or_copy,
    _service,
)

if TYPE_CHECKING:
    from kproxy._fastpath_relay_py import RelayLoop

__all__: list[str] = []  # functions of RelayLoop, which is the public name

_MAX_LEVELS: Final = 8
_ACCEPT_BATCH: Final = 64
_TRANSIENT_ACCEPT: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOBUFS, errno.ENOMEM}
)
_FD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})

Backends = tuple[tuple[int, tuple[str, int] | tuple[str, int, int, int]], ...]


class _Listener:
    __slots__ = ("be", "delay", "exhausted", "fd", "id", "paused", "resume_at", "rr")

    def __init__(self, lid: int, fd: int, delay: float) -> None:
        self.id, self.fd, self.delay = lid, fd, delay
        self.be: Backends = ()
        self.rr = 0
        self.paused = False
        self.exhausted = False
        self.resume_at = 0.0


def _timeout(self: RelayLoop) -> float:
    first = self._timers[0][0] if self._timers else None
    for lst in self._listeners.values():
        if lst.paused and (first is None or lst.resume_at < first):
            first = lst.resume_at
    if first is None:
        return -1
    return max(0.0, first - time.monotonic() + 0.001)


def _run_timers(self: RelayLoop) -> None:
    now = time.monotonic()
    while self._timers and self._timers[0][0] <= now:
        _, _, bfd, c, attempt = heapq.heappop(self._timers)
        # Lazily dropped: the attempt this timer watched already ended.
        if c.dialling and c.attempt == attempt and c.fd[1] == bfd:
            _dial_failed(self, c, errno.ETIMEDOUT)
    for lst in self._listeners.values():
        if lst.paused and lst.resume_at <= now:
            lst.paused = False
            self._ep.modify(lst.fd, select.EPOLLIN)


def _event(self: RelayLoop, lid: int, kind: int, err: int) -> None:
    if self._on_event is not None:
        self._done.append((lid, kind, err, -1))


def _listen(self: RelayLoop, fd: int, lid: int) -> None:
    lst = _Listener(lid, fd, self._pause_min)
    self._listeners[fd] = lst
    try:
        os.set_blocking(fd, False)
        # Level-triggered: a batch limit leaves the rest for the next turn.
        self._ep.register(fd, select.EPOLLIN)
    except OSError as e:
        _event(self, lid, self.EV_ACCEPT_FAILED, e.errno or errno.EBADF)
        _unlisten(self, lst)


def _find_listener(self: RelayLoop, lid: int) -> _Listener | None:
    return next((lst for lst in self._listeners.values() if lst.id == lid), None)


def _unlisten(self: RelayLoop, lst: _Listener) -> None:
    with contextlib.suppress(OSError, ValueError):
        self._ep.unregister(lst.fd)
    os.close(lst.fd)
    del self._listeners[lst.fd]


def _close_listeners(self: RelayLoop) -> None:
    for lst in list(self._listeners.values()):
        _unlisten(self, lst)


def _set_backends(self: RelayLoop, lid: int, key: int) -> None:
    with self._lock:
        be = self._pending_be.pop(key, ())
    lst = _find_listener(self, lid)
    if lst is not None:
        # Dialling connections keep the list they started with (new connections only).
        lst.be = be
        lst.rr = 0


def _accept(self: RelayLoop, lst: _Listener) -> None:
    for _ in range(_ACCEPT_BATCH):
        try:
            cfd, _addr = _accept4(lst.fd)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in _FD_ERRNOS:
                # Back-pressure, not a crash: the client waits in the backlog.
                lst.paused = lst.exhausted = True
                lst.resume_at = time.monotonic() + lst.delay
                lst.delay = min(lst.delay * 2, self._pause_max)
                self._ep.modify(lst.fd, 0)
                _event(self, lst.id, self.EV_FD_EXHAUSTED, e.errno or 0)
                return
            if e.errno in _TRANSIENT_ACCEPT:
                continue  # concerns that one connection only
            _event(self, lst.id, self.EV_ACCEPT_FAILED, e.errno or 0)
            _unlisten(self, lst)
            return
        if lst.exhausted:
            lst.exhausted = False
            lst.delay = self._pause_min
            _event(self, lst.id, self.EV_ACCEPTING, 0)
        self.accepted += 1
        if not lst.be:
            self.refused += 1
            _linger_zero(cfd)
            os.close(cfd)
            _event(self, lst.id, self.EV_REFUSED, 0)
            continue
        _nodelay(cfd)
        c = _Conn(-1, cfd, -1)
        c.dialling = True
        c.lid = lst.id
        c.be = lst.be
        c.first = lst.rr
        lst.rr += 1
        self._conns[cfd] = c
        self.started += 1
        self.active += 1
        self.accepted_active += 1
        _dial(self, c)


def _dial(self: RelayLoop, c: _Conn) -> None:
    """Upstream's tryConnect: one attempt per dial timeout, the next endpoint each time."""
    while c.attempt < len(self._levels):
        family, addr = c.be[(c.first + c.attempt) % len(c.be)]
        try:
            bfd = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK).detach()
        except OSError as e:
            self.dial_failures += 1
            if e.errno in _FD_ERRNOS:
                _event(self, c.lid, self.EV_FD_EXHAUSTED, e.errno or 0)
                _dial_give_up(self, c)
                return
            _event(self, c.lid, self.EV_DIAL_FAILED, e.errno or 0)
            c.attempt += 1
            continue
        _nodelay(bfd)
        with socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(bfd)) as s:
            s.setblocking(False)  # a blocking socket object would wait for the connect
            err = s.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            try:
                self._ep.register(bfd, _ET_EVENTS)
            except OSError as e:
                err = e.errno or errno.EBADF
            else:
                c.fd = (c.fd[0], bfd)
                self._conns[bfd] = c
                c.deadline = time.monotonic() + self._levels[c.attempt]
                self._timer_seq += 1
                heapq.heappush(self._timers, (c.deadline, self._timer_seq, bfd, c, c.attempt))
                return  # EPOLLOUT (or the error) reports the outcome
        os.close(bfd)
        self.dial_failures += 1
        _event(self, c.lid, self.EV_DIAL_FAILED, err)
        c.attempt += 1
    _dial_give_up(self, c)


def _dial_failed(self: RelayLoop, c: _Conn, err: int) -> None:
    bfd = c.fd[1]
    with contextlib.suppress(OSError, ValueError):
        self._ep.unregister(bfd)
    del self._conns[bfd]
    os.close(bfd)
    c.fd = (c.fd[0], -1)
    self.dial_failures += 1
    _event(self, c.lid, self.EV_DIAL_FAILED, err)
    c.attempt += 1
    _dial(self, c)


def _dial_give_up(self: RelayLoop, c: _Conn) -> None:
    # No endpoint answered: reset the client at once.
    self.refused += 1
    _event(self, c.lid, self.EV_REFUSED, errno.ECONNREFUSED)
    c.error = errno.ECONNREFUSED
    _finish(self, c)


def _connected(self: RelayLoop, c: _Conn, mask: int) -> None:
    try:
        with socket.socket(fileno=os.dup(c.fd[1])) as s:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as e:
        err = e.errno or errno.EBADF
    if not err and mask & (select.EPOLLERR | select.EPOLLHUP):
        err = errno.ECONNREFUSED
    if err:
        _dial_failed(self, c, err)
        return
    if not mask & select.EPOLLOUT:
        return  # not decided yet
    c.dialling = False
    c.be = ()
    for d in (0, 1):
        _pipe_or_copy(self, c, d)
    # The backend leg is registered already (same events).
    try:
        self._ep.register(c.fd[0], _ET_EVENTS)
    except OSError as e:
        c.error = e.errno or errno.EBADF
    if c.error:
        _finish(self, c)
        return
    _service(self, c)


def _accept4(fd: int) -> tuple[int, object]:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.setblocking(False)
        conn, addr = s.accept()
    conn.setblocking(False)
    return conn.detach(), addr


def _nodelay(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
