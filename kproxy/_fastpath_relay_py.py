"""Pure-Python twin of the relay loop of :mod:`kproxy._fastpath` (``_fastpath_relay.pxi``).

Re-exported by :mod:`kproxy._fastpath_py`. Owns :class:`RelayLoop`: one relay
thread with an edge-triggered epoll loop, fed through a control pipe, that
relays fd pairs (the byte relay is :mod:`kproxy._fastpath_splice_py`) and
accepts from listening sockets and dials their backends
(:mod:`kproxy._fastpath_accept_py`). This module owns the class: its state,
the caller API, the control pipe, the loop's dispatch and the completion
reports. The other two are functions of the loop's state (``self``), as in
the compiled build, where Cython allows no ``include`` inside a class body;
each of them documents its part of the contract.

Contract, identical in both builds:

- ``on_done(conn_id, client_to_backend, backend_to_client, error)`` is called
  once per pair on the relay thread; ``error`` is 0 for a clean end, else an
  errno (``ECONNABORTED`` for ``abort_all``/``close``);
- ``abort_all()`` resets every pair added before it; ``close()`` resets every
  pair, stops the thread and closes the loop's own fds (idempotent);
- control messages (``add``, ``listen``, ``set_backends``, ...) are handled in
  the order sent and before the other events of the same epoll batch, so a
  ``set_backends()`` issued before a client connected applies to it;
- ``on_done`` and ``on_event`` run after each epoll batch, batched; one that
  raises is logged and the loop goes on.

Python only hands over fds here; the compiled build runs the same loop in C
with the GIL released, and this one releases it inside each ``os.splice``.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Final

from kproxy._fastpath_accept_py import (
    _MAX_LEVELS,
    Backends,
    _accept,
    _close_listeners,
    _connected,
    _find_listener,
    _listen,
    _Listener,
    _run_timers,
    _set_backends,
    _timeout,
    _unlisten,
)
from kproxy._fastpath_splice_py import (
    _abort_all,
    _add,
    _check_error,
    _close_pool,
    _Conn,
    _Pipe,
    _service,
)

__all__ = ["RelayLoop"]

log = logging.getLogger("kproxy.fastpath.relay")

_OP_ADD: Final = 1
_OP_ABORT_ALL: Final = 2
_OP_STOP: Final = 3
_OP_LISTEN: Final = 4  # a = fd (the loop owns it), b = listener id
_OP_UNLISTEN: Final = 5  # a = listener id
_OP_BACKENDS: Final = 6  # a = listener id, id = key of the pending list
_CTL: Final = struct.Struct("=iiiiq")  # same 24-byte layout as the compiled loop's
_CTL_TAG: Final = -1

OnDone = Callable[[int, int, int, int], object]
OnEvent = Callable[[int, int, int], object]


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
        _close_pool(self)
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
                events = self._ep.poll(_timeout(self), 256)
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
                    _accept(self, listener)
                    continue
                c = self._conns.get(tag)
                if c is None:
                    continue  # a pair closed earlier in this batch
                if c.dialling:
                    _connected(self, c, mask)
                    continue
                if mask & select.EPOLLERR:
                    _check_error(self, c, 0 if tag == c.fd[0] else 1)
                _service(self, c)
            _run_timers(self)
            if self._done:
                self._report()
        _abort_all(self)
        _close_listeners(self)
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
                    _add(self, a, b, cid)
                elif op == _OP_ABORT_ALL:
                    _abort_all(self)
                elif op == _OP_STOP:
                    self._stopping = True
                elif op == _OP_LISTEN:
                    _listen(self, a, b)
                elif op == _OP_UNLISTEN:
                    lst = _find_listener(self, a)
                    if lst is not None:
                        _unlisten(self, lst)
                elif op == _OP_BACKENDS:
                    _set_backends(self, a, cid)

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
