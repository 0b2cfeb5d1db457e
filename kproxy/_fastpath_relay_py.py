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

Python only hands over fds here; the compiled build runs the same loop in C
with the GIL released, and this one releases it inside each ``os.splice``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["RELAY_COPY_BUFFER", "RelayLoop"]

log = logging.getLogger("kproxy.fastpath.relay")

RELAY_COPY_BUFFER: Final = 65536
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_OP_ADD: Final = 1
_OP_ABORT_ALL: Final = 2
_OP_STOP: Final = 3
_CTL: Final = struct.Struct("=iiiiq")  # same 24-byte layout as the compiled loop's
_CTL_TAG: Final = -1
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_ET_EVENTS: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

OnDone = Callable[[int, int, int, int], object]


class _Pipe:
    __slots__ = ("r", "size", "w")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r, self.w, self.size = r, w, size


class _Conn:
    __slots__ = ("copy", "done", "eof", "error", "fd", "id", "inpipe", "nbytes", "pending", "pipe")

    def __init__(self, cid: int, cfd: int, bfd: int) -> None:
        self.id = cid
        self.fd = (cfd, bfd)
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

    def __init__(
        self,
        on_done: OnDone,
        *,
        pipe_size: int = 262144,
        force_copy: bool = False,
        max_pooled_pipes: int = 64,
    ) -> None:
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

    def close(self) -> None:
        """Abort every pair, stop the thread and release the loop's own fds; idempotent."""
        if self._closed:
            return
        self._send(_OP_STOP, 0, 0, 0)
        self._closed = True
        self._thread.join()
        self._close_pool()
        self._ep.close()
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
        }

    # -- relay thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._ep.poll(-1, 256)
            except InterruptedError:
                continue
            for tag, mask in events:
                if tag == self._ctl_r:
                    self._control()
                    continue
                c = self._conns.get(tag)
                if c is None:
                    continue  # a pair closed earlier in this batch
                if mask & select.EPOLLERR:
                    self._check_error(c, 0 if tag == c.fd[0] else 1)
                self._service(c)
            if self._done:
                self._report()
        self._abort_all()
        if self._done:
            self._report()

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
        for d in (0, 1):
            fd = c.fd[d]
            if not clean:
                # An error on either leg resets both, so the reset propagates.
                _linger_zero(fd)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)
            os.close(fd)
            self._pipe_put(c.pipe[d], clean and c.inpipe[d] == 0)
            c.pipe[d] = None
        del self._conns[c.fd[0]]
        del self._conns[c.fd[1]]
        self.active -= 1
        if clean:
            self.finished += 1
        else:
            self.aborted += 1
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
                self._on_done(cid, up, down, err)
            except Exception:
                log.exception("relay completion callback failed")


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
