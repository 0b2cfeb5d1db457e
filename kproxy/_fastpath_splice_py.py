"""Pure-Python twin of the byte relay of :mod:`kproxy._fastpath` (``_fastpath_splice.pxi``).

Re-exported by :mod:`kproxy._fastpath_py` (:data:`RELAY_COPY_BUFFER`). Owns how
:class:`~kproxy._fastpath_relay_py.RelayLoop` moves the bytes of each pair:
``splice(2)`` through a pipe per direction (pipes pooled between pairs),
``SPLICE_F_MOVE | SPLICE_F_NONBLOCK`` and never ``SPLICE_F_MORE`` (it corks:
~200 ms per small message). Where splice is refused (``EINVAL``/``ENOSYS``)
that direction falls back to recv/send, as HAProxy does; ``force_copy=True``
copies from the start (baseline, tests). Also owns the per-connection record
:class:`_Conn` (its dial fields are :mod:`kproxy._fastpath_accept_py`'s) and
the byte counters. Functions of the loop's state (``self``), run on the relay
thread.

Contract, identical in both builds:

- ``add(client_fd, backend_fd, conn_id)`` hands over a connected pair; the loop
  owns both fds from then on, makes them non-blocking, sets TCP_NODELAY
  (ignored on non-TCP sockets) and closes each exactly once;
- EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once every byte
  before it is delivered; the other direction keeps flowing; the pair is done
  (closed with FINs) when both directions are;
- an error on either leg (reset, broken pipe, a pending ``SO_ERROR``) closes
  both legs with an RST (SO_LINGER 0);
- a pipe goes back to the pool only when its pair ended clean with nothing
  left in it; ``active == started - finished - aborted``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kproxy._fastpath_accept_py import Backends
    from kproxy._fastpath_relay_py import RelayLoop

__all__ = ["RELAY_COPY_BUFFER"]

RELAY_COPY_BUFFER: Final = 65536
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_ET_EVENTS: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class _Pipe:
    __slots__ = ("r", "size", "w")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r, self.w, self.size = r, w, size


# One connection: a pair being relayed or, while ``dialling``, a client accepted
# by _fastpath_accept_py whose backend connect is in progress (dialling, lid,
# be, first, attempt and deadline are that module's).
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


def _pipe_get(self: RelayLoop) -> _Pipe:
    if self._pool:
        return self._pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # A bigger pipe moves more per splice; refused → the default 64 KiB.
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._pipe_size)
    except OSError:
        size = 65536
    return _Pipe(r, w, size)


def _pipe_put(self: RelayLoop, p: _Pipe | None, clean: bool) -> None:
    if p is None:
        return
    if clean and len(self._pool) < self._max_pool:
        self._pool.append(p)
    else:
        os.close(p.r)
        os.close(p.w)


def _close_pool(self: RelayLoop) -> None:
    while self._pool:
        p = self._pool.pop()
        os.close(p.r)
        os.close(p.w)


def _pipe_or_copy(self: RelayLoop, c: _Conn, d: int) -> None:
    """Direction ``d`` of ``c`` gets a pooled pipe, or copies (``force_copy``, or out
    of pipes: copying a pair beats refusing it)."""
    if self._force_copy:
        c.copy[d] = True
        return
    try:
        c.pipe[d] = _pipe_get(self)
    except OSError:
        c.copy[d] = True


def _add(self: RelayLoop, cfd: int, bfd: int, cid: int) -> None:
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
        _pipe_or_copy(self, c, d)
        try:
            self._ep.register(fd, _ET_EVENTS)
        except OSError as e:
            c.error = c.error or e.errno or errno.EBADF
    if c.error:
        _finish(self, c)
        return
    _service(self, c)


def _check_error(self: RelayLoop, c: _Conn, side: int) -> None:
    try:
        with socket.socket(fileno=os.dup(c.fd[side])) as s:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return
    if err and not c.error:
        c.error = err


def _pump(self: RelayLoop, c: _Conn, d: int) -> bool:
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


def _service(self: RelayLoop, c: _Conn) -> None:
    if not c.error and _pump(self, c, 0):
        _pump(self, c, 1)
    if c.error or (c.done[0] and c.done[1]):
        _finish(self, c)


def _finish(self: RelayLoop, c: _Conn) -> None:
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
        _pipe_put(self, c.pipe[d], clean and c.inpipe[d] == 0)
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


def _abort_all(self: RelayLoop) -> None:
    for c in list({id(c): c for c in self._conns.values()}.values()):
        if not c.error:
            c.error = errno.ECONNABORTED
        _finish(self, c)


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
