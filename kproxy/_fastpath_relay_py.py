"""Pure-Python twin of the relay loop of :mod:`kproxy._fastpath` (``_fastpath_relay.pxi``).

Re-exported by :mod:`kproxy._fastpath_py`. Owns :class:`RelayLoop`: one relay
thread with an edge-triggered epoll loop that moves bytes between the two fds
of each pair with ``splice(2)`` through a pipe per direction (pipes pooled
between pairs), ``SPLICE_F_MOVE | SPLICE_F_NONBLOCK`` and never
``SPLICE_F_MORE`` (it corks: ~200 ms per small message). Where splice is
refused (``EINVAL``/``ENOSYS``) that direction falls back to recv/send, as
HAProxy does; ``force_copy=True`` copies from the start (baseline, tests).

Contract, identical in both builds:

- ``add(client_fd, backend_fd, conn_id)`` hands over a connected pair; the loop
  owns both fds from then on, makes them non-blocking, sets TCP_NODELAY
  (ignored on non-TCP sockets) and closes each exactly once;
- EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once every byte
  before it is delivered; the other direction keeps flowing; the pair is done
  (closed with FINs) when both directions are;
- an error on either leg (reset, broken pipe, a pending ``SO_ERROR``) closes
  both legs with an RST (SO_LINGER 0);
- ``on_done(conn_id, client_to_backend, backend_to_client, error)`` is called
  once per pair on the relay thread; ``error`` is 0 for a clean end, else an
  errno (``ECONNABORTED`` for ``abort_all``/``close``);
- ``abort_all()`` resets every pair added before it; ``close()`` resets every
  pair, stops the thread and closes the loop's own fds (idempotent).

Accepting in the loop (the connection-rate path: no Python per connection in
the compiled build):

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

Python only hands over fds here; the compiled build runs the same loop in C
with the GIL released, and this one releases it inside each ``os.splice``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["RELAY_COPY_BUFFER", "RelayLoop"]

log = logging.getLogger("kproxy.fastpath.relay")

RELAY_COPY_BUFFER: Final = 65536
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_OP_ADD: Final = 1
_OP_ABORT_ALL: Final = 2
_OP_STOP: Final = 3
_OP_LISTEN: Final = 4  # a = fd (the loop owns it), b = listener id
_OP_UNLISTEN: Final = 5  # a = listener id
_OP_BACKENDS: Final = 6  # a = listener id, id = key of the pending list
_MAX_LEVELS: Final = 8
_ACCEPT_BATCH: Final = 64
_TRANSIENT_ACCEPT: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOBUFS, errno.ENOMEM}
)
_FD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})
_CTL: Final = struct.Struct("=iiiiq")  # same 24-byte layout as the compiled loop's
_CTL_TAG: Final = -1
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_ET_EVENTS: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

OnDone = Callable[[int, int, int, int], object]
OnEvent = Callable[[int, int, int], object]
Backends = tuple[tuple[int, tuple[str, int] | tuple[str, int, int, int]], ...]


class _Pipe:
    __slots__ = ("r", "size", "w")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r, self.w, self.size = r, w, size


class _Listener:
    __slots__ = ("be", "delay", "exhausted", "fd", "id", "paused", "resume_at", "rr")

    def __init__(self, lid: int, fd: int, delay: float) -> None:
        self.id, self.fd, self.delay = lid, fd, delay
        self.be: Backends = ()
        self.rr = 0
        self.paused = False
        self.exhausted = False
        self.resume_at = 0.0


class _Conn:
    __slots__ = (
        "attempt", "be", "copy", "deadline", "dialling", "done", "eof", "error", "fd",
        "first", "id", "inpipe", "lid", "nbytes", "pending", "pipe",
    )  # fmt: skip

    def __init__(self, cid: int, cfd: int, bfd: int) -> None:
        self.id = cid
        self.fd = (cfd, bfd)
        self.dialling = False
        self.lid = 0
        self.be: Backends = ()
        self.first = 0
        self.attempt = 0
        self.deadline = 0.0
        self.pipe: list[_Pipe | None] = [None, None]  # direction d: fd[d] -> fd[1 - d]
        self.pending = [b"", b""]  # copy mode: bytes read, not yet sent
        self.inpipe = [0, 0]  # splice mode: bytes sitting in the pipe
        self.eof = [False, False]
        self.done = [False, False]
        self.copy = [False, False]
        self.nbytes = [0, 0]
        self.error = 0


class RelayLoop:
    """Relays fd pairs until both directions end (contract in the module docstring)."""

    EV_REFUSED: Final = 1
    EV_DIAL_FAILED: Final = 2
    EV_FD_EXHAUSTED: Final = 3
    EV_ACCEPTING: Final = 4
    EV_ACCEPT_FAILED: Final = 5

    def __init__(
        self,
        on_done: OnDone,
        *,
        pipe_size: int = 262144,
        force_copy: bool = False,
        max_pooled_pipes: int = 64,
        on_event: OnEvent | None = None,
        dial_timeouts: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
        accept_pause: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        if not 1 <= len(dial_timeouts) <= _MAX_LEVELS:
            raise ValueError(f"1 to {_MAX_LEVELS} dial timeouts, not {len(dial_timeouts)}")
        # Whole milliseconds, as the compiled loop keeps them.
        self._levels = [max(1, int(t * 1000)) / 1000 for t in dial_timeouts]
        self._pause_min = max(1, int(accept_pause[0] * 1000)) / 1000
        self._pause_max = max(self._pause_min, int(accept_pause[1] * 1000) / 1000)
        self._on_event = on_event
        self._listeners: dict[int, _Listener] = {}  # by fd
        self._pending_be: dict[int, Backends] = {}  # set_backends → loop thread
        self._be_seq = 0
        self._timers: list[tuple[float, int, int, _Conn, int]] = []
        self._timer_seq = 0
        self.accepted = 0
        self.accepted_active = 0
        self.refused = 0
        self.dial_failures = 0
        self._on_done = on_done
        self._pipe_size = pipe_size
        self._force_copy = force_copy
        self._max_pool = max_pooled_pipes
        self._pool: list[_Pipe] = []
        self._conns: dict[int, _Conn] = {}  # keyed by both fds (unique while open)
        self._done: list[tuple[int, int, int, int]] = []
        self._stopping = False
        self.active = 0
        self.started = 0
        self.finished = 0
        self.aborted = 0
        self.bytes_relayed = 0
        self.copy_fallbacks = 0
        self._ep = select.epoll()
        self._ctl_r, self._ctl_w = os.pipe()
        os.set_blocking(self._ctl_r, False)
        self._ep.register(self._ctl_r, select.EPOLLIN)
        self._closed = False
        self._lock = threading.Lock()  # serialises control writes (os.write may be partial)
        self._thread = threading.Thread(target=self._run, name="kproxy-relay", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------

    def _send(self, op: int, a: int, b: int, cid: int) -> None:
        if self._closed:
            raise RuntimeError("relay loop is closed")
        with self._lock:
            os.write(self._ctl_w, _CTL.pack(op, a, b, 0, cid))

    def add(self, client_fd: int, backend_fd: int, conn_id: int) -> None:
        """Relay the connected pair; the loop owns (and will close) both fds from here on."""
        self._send(_OP_ADD, client_fd, backend_fd, conn_id)

    def abort_all(self) -> None:
        """Reset and close every pair being relayed (pairs added later are not affected)."""
        self._send(_OP_ABORT_ALL, 0, 0, 0)

    def listen(self, fd: int, listener_id: int) -> None:
        """Accept from the listening socket ``fd`` (the loop owns it from here on).

        Until set_backends() names endpoints, every connection is reset.
        """
        self._send(_OP_LISTEN, fd, listener_id, 0)

    def unlisten(self, listener_id: int) -> None:
        """Stop accepting and close the loop's fd; connections already accepted go on."""
        self._send(_OP_UNLISTEN, listener_id, 0, 0)

    def set_backends(self, listener_id: int, endpoints: Sequence[tuple[str, int]]) -> None:
        """The (ip, port) round robin of new connections of the listener (in order)."""
        be: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]] = []
        for host, port in endpoints:
            host = str(host).strip("[]")
            port = int(port)
            if not 0 < port < 65536:
                raise ValueError(f"bad port {port}")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                socket.inet_pton(family, host)
            except OSError:
                raise ValueError(f"bad address {host.encode()!r}") from None
            be.append((family, (host, port) if family == socket.AF_INET else (host, port, 0, 0)))
        with self._lock:
            self._be_seq += 1
            key = self._be_seq
            self._pending_be[key] = tuple(be)
        self._send(_OP_BACKENDS, listener_id, 0, key)

    def close(self) -> None:
        """Abort every pair, stop the thread and release the loop's own fds; idempotent."""
        if self._closed:
            return
        self._send(_OP_STOP, 0, 0, 0)
        self._closed = True
        self._thread.join()
        self._close_pool()
        self._ep.close()
        self._pending_be.clear()
        os.close(self._ctl_r)
        os.close(self._ctl_w)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        return {
            "active": self.active,
            "started": self.started,
            "finished": self.finished,
            "aborted": self.aborted,
            "bytes": self.bytes_relayed,
            "copy_fallbacks": self.copy_fallbacks,
            "pooled_pipes": len(self._pool),
            "accepted": self.accepted,
            "accepted_active": self.accepted_active,
            "refused": self.refused,
            "dial_failures": self.dial_failures,
        }

    # -- relay thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._ep.poll(self._timeout(), 256)
            except InterruptedError:
                continue
            # Control first: a set_backends() issued before a client connected must
            # apply to it even when both are reported in the same batch.
            if any(tag == self._ctl_r for tag, _ in events):
                self._control()
            for tag, mask in events:
                if tag == self._ctl_r:
                    continue
                listener = self._listeners.get(tag)
                if listener is not None:
                    self._accept(listener)
                    continue
                c = self._conns.get(tag)
                if c is None:
                    continue  # a pair closed earlier in this batch
                if c.dialling:
                    self._connected(c, mask)
                    continue
                if mask & select.EPOLLERR:
                    self._check_error(c, 0 if tag == c.fd[0] else 1)
                self._service(c)
            self._run_timers()
            if self._done:
                self._report()
        self._abort_all()
        self._close_listeners()
        if self._done:
            self._report()

    # -- accept and dial (listeners handed over with listen()) ----------------------

    def _timeout(self) -> float:
        first = self._timers[0][0] if self._timers else None
        for lst in self._listeners.values():
            if lst.paused and (first is None or lst.resume_at < first):
                first = lst.resume_at
        if first is None:
            return -1
        return max(0.0, first - time.monotonic() + 0.001)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, bfd, c, attempt = heapq.heappop(self._timers)
            # Lazily dropped: the attempt this timer watched already ended.
            if c.dialling and c.attempt == attempt and c.fd[1] == bfd:
                self._dial_failed(c, errno.ETIMEDOUT)
        for lst in self._listeners.values():
            if lst.paused and lst.resume_at <= now:
                lst.paused = False
                self._ep.modify(lst.fd, select.EPOLLIN)

    def _event(self, lid: int, kind: int, err: int) -> None:
        if self._on_event is not None:
            self._done.append((lid, kind, err, -1))

    def _listen(self, fd: int, lid: int) -> None:
        lst = _Listener(lid, fd, self._pause_min)
        self._listeners[fd] = lst
        try:
            os.set_blocking(fd, False)
            # Level-triggered: a batch limit leaves the rest for the next turn.
            self._ep.register(fd, select.EPOLLIN)
        except OSError as e:
            self._event(lid, self.EV_ACCEPT_FAILED, e.errno or errno.EBADF)
            self._unlisten(lst)

    def _find_listener(self, lid: int) -> _Listener | None:
        return next((lst for lst in self._listeners.values() if lst.id == lid), None)

    def _unlisten(self, lst: _Listener) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(lst.fd)
        os.close(lst.fd)
        del self._listeners[lst.fd]

    def _close_listeners(self) -> None:
        for lst in list(self._listeners.values()):
            self._unlisten(lst)

    def _set_backends(self, lid: int, key: int) -> None:
        with self._lock:
            be = self._pending_be.pop(key, ())
        lst = self._find_listener(lid)
        if lst is not None:
            # Dialling connections keep the list they started with (new connections only).
            lst.be = be
            lst.rr = 0

    def _accept(self, lst: _Listener) -> None:
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
                    self._event(lst.id, self.EV_FD_EXHAUSTED, e.errno or 0)
                    return
                if e.errno in _TRANSIENT_ACCEPT:
                    continue  # concerns that one connection only
                self._event(lst.id, self.EV_ACCEPT_FAILED, e.errno or 0)
                self._unlisten(lst)
                return
            if lst.exhausted:
                lst.exhausted = False
                lst.delay = self._pause_min
                self._event(lst.id, self.EV_ACCEPTING, 0)
            self.accepted += 1
            if not lst.be:
                self.refused += 1
                _linger_zero(cfd)
                os.close(cfd)
                self._event(lst.id, self.EV_REFUSED, 0)
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
            self._dial(c)

    def _dial(self, c: _Conn) -> None:
        """Upstream's tryConnect: one attempt per dial timeout, the next endpoint each time."""
        while c.attempt < len(self._levels):
            family, addr = c.be[(c.first + c.attempt) % len(c.be)]
            try:
                bfd = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK).detach()
            except OSError as e:
                self.dial_failures += 1
                if e.errno in _FD_ERRNOS:
                    self._event(c.lid, self.EV_FD_EXHAUSTED, e.errno or 0)
                    self._dial_give_up(c)
                    return
                self._event(c.lid, self.EV_DIAL_FAILED, e.errno or 0)
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
            self._event(c.lid, self.EV_DIAL_FAILED, err)
            c.attempt += 1
        self._dial_give_up(c)

    def _dial_failed(self, c: _Conn, err: int) -> None:
        bfd = c.fd[1]
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(bfd)
        del self._conns[bfd]
        os.close(bfd)
        c.fd = (c.fd[0], -1)
        self.dial_failures += 1
        self._event(c.lid, self.EV_DIAL_FAILED, err)
        c.attempt += 1
        self._dial(c)

    def _dial_give_up(self, c: _Conn) -> None:
        # No endpoint answered: reset the client at once.
        self.refused += 1
        self._event(c.lid, self.EV_REFUSED, errno.ECONNREFUSED)
        c.error = errno.ECONNREFUSED
        self._finish(c)

    def _connected(self, c: _Conn, mask: int) -> None:
        try:
            with socket.socket(fileno=os.dup(c.fd[1])) as s:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            err = e.errno or errno.EBADF
        if not err and mask & (select.EPOLLERR | select.EPOLLHUP):
            err = errno.ECONNREFUSED
        if err:
            self._dial_failed(c, err)
            return
        if not mask & select.EPOLLOUT:
            return  # not decided yet
        c.dialling = False
        c.be = ()
        for d in (0, 1):
            if self._force_copy:
                c.copy[d] = True
            else:
                try:
                    c.pipe[d] = self._pipe_get()
                except OSError:
                    c.copy[d] = True
        # The backend leg is registered already (same events).
        try:
            self._ep.register(c.fd[0], _ET_EVENTS)
        except OSError as e:
            c.error = e.errno or errno.EBADF
        if c.error:
            self._finish(c)
            return
        self._service(c)

    def _control(self) -> None:
        while True:
            try:
                data = os.read(self._ctl_r, _CTL.size * 64)
            except BlockingIOError:
                return
            if not data:
                return
            for op, a, b, _, cid in _CTL.iter_unpack(data):
                if op == _OP_ADD:
                    self._add(a, b, cid)
                elif op == _OP_ABORT_ALL:
                    self._abort_all()
                elif op == _OP_STOP:
                    self._stopping = True
                elif op == _OP_LISTEN:
                    self._listen(a, b)
                elif op == _OP_UNLISTEN:
                    lst = self._find_listener(a)
                    if lst is not None:
                        self._unlisten(lst)
                elif op == _OP_BACKENDS:
                    self._set_backends(a, cid)

    def _pipe_get(self) -> _Pipe:
        if self._pool:
            return self._pool.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # A bigger pipe moves more per splice; refused → the default 64 KiB.
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._pipe_size)
        except OSError:
            size = 65536
        return _Pipe(r, w, size)

    def _pipe_put(self, p: _Pipe | None, clean: bool) -> None:
        if p is None:
            return
        if clean and len(self._pool) < self._max_pool:
            self._pool.append(p)
        else:
            os.close(p.r)
            os.close(p.w)

    def _close_pool(self) -> None:
        while self._pool:
            p = self._pool.pop()
            os.close(p.r)
            os.close(p.w)

    def _add(self, cfd: int, bfd: int, cid: int) -> None:
        self.started += 1
        self.active += 1
        c = _Conn(cid, cfd, bfd)
        self._conns[cfd] = c
        self._conns[bfd] = c
        for d in (0, 1):
            fd = c.fd[d]
            try:
                os.set_blocking(fd, False)
            except OSError as e:
                c.error = c.error or e.errno or errno.EBADF
                continue
            try:
                with socket.socket(fileno=os.dup(fd)) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (tests use AF_UNIX pairs): nothing to tune
            if self._force_copy:
                c.copy[d] = True
            else:
                try:
                    c.pipe[d] = self._pipe_get()
                except OSError:
                    c.copy[d] = True  # out of pipes: copy this pair instead of refusing it
            try:
                self._ep.register(fd, _ET_EVENTS)
            except OSError as e:
                c.error = c.error or e.errno or errno.EBADF
        if c.error:
            self._finish(c)
            return
        self._service(c)

    def _check_error(self, c: _Conn, side: int) -> None:
        try:
            with socket.socket(fileno=os.dup(c.fd[side])) as s:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return
        if err and not c.error:
            c.error = err

    def _pump(self, c: _Conn, d: int) -> bool:
        """Move fd[d] -> fd[1 - d] until both would block; False when the pair failed."""
        if c.done[d]:
            return True
        src, dst = c.fd[d], c.fd[1 - d]
        try:
            while True:
                if c.copy[d] and c.pending[d]:
                    n = _send(dst, c.pending[d])
                    if n is None:
                        return True  # the peer's window is full; EPOLLOUT brings us back
                    c.pending[d] = c.pending[d][n:]
                    c.nbytes[d] += n
                    self.bytes_relayed += n
                    continue
                pipe = c.pipe[d]
                if not c.copy[d] and c.inpipe[d] > 0:
                    assert pipe is not None
                    try:
                        n = os.splice(pipe.r, dst, c.inpipe[d], flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        return True
                    if n == 0:
                        raise OSError(errno.ECONNABORTED, "splice wrote nothing")
                    c.inpipe[d] -= n
                    c.nbytes[d] += n
                    self.bytes_relayed += n
                    continue
                if c.eof[d]:
                    break
                if c.copy[d]:
                    try:
                        data = os.read(src, RELAY_COPY_BUFFER)
                    except BlockingIOError:
                        return True
                    if data:
                        c.pending[d] = data
                    else:
                        c.eof[d] = True
                    continue
                assert pipe is not None
                try:
                    n = os.splice(src, pipe.w, pipe.size, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return True
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    # splice refused for this fd type: HAProxy's fallback to a copy.
                    c.copy[d] = True
                    self.copy_fallbacks += 1
                    continue
                if n:
                    c.inpipe[d] = n
                else:
                    c.eof[d] = True
            # EOF seen and everything before it delivered: pass the FIN on.
            _shutdown_wr(dst)
        except InterruptedError:
            return True  # edge-triggered: the event that brought us here is still pending
        except OSError as e:
            c.error = e.errno or errno.ECONNABORTED
            return False
        c.done[d] = True
        return True

    def _service(self, c: _Conn) -> None:
        if not c.error and self._pump(c, 0):
            self._pump(c, 1)
        if c.error or (c.done[0] and c.done[1]):
            self._finish(c)

    def _finish(self, c: _Conn) -> None:
        clean = not c.error
        c.dialling = False
        c.be = ()
        for d in (0, 1):
            fd = c.fd[d]
            if fd < 0:
                continue
            if not clean:
                # An error on either leg resets both, so the reset propagates.
                _linger_zero(fd)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)
            os.close(fd)
            self._pipe_put(c.pipe[d], clean and c.inpipe[d] == 0)
            c.pipe[d] = None
        for fd in c.fd:
            if fd >= 0:
                del self._conns[fd]
        self.active -= 1
        if clean:
            self.finished += 1
        else:
            self.aborted += 1
        if c.id < 0:
            # Accepted here: no per-pair report (Python never saw it; counters say it).
            self.accepted_active -= 1
        else:
            self._done.append((c.id, c.nbytes[0], c.nbytes[1], c.error))

    def _abort_all(self) -> None:
        for c in list({id(c): c for c in self._conns.values()}.values()):
            if not c.error:
                c.error = errno.ECONNABORTED
            self._finish(c)

    def _report(self) -> None:
        done, self._done = self._done, []
        for cid, up, down, err in done:
            try:
                if err == -1 and self._on_event is not None:
                    self._on_event(cid, up, down)  # an event: (listener id, kind, errno)
                else:
                    self._on_done(cid, up, down, err)
            except Exception:
                log.exception("relay completion callback failed")


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


def _send(fd: int, data: bytes) -> int | None:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return None


def _shutdown_wr(fd: int) -> None:
    with socket.socket(fileno=os.dup(fd)) as s:
        s.shutdown(socket.SHUT_WR)


def _linger_zero(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass
