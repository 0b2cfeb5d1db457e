"""The zero-copy relay: :class:`~.relay.Relay` on top of :class:`kproxy.fastpath.RelayLoop`.

Owns :class:`SpliceRelay`, a drop-in replacement for
:class:`~.relay.AsyncioRelay`. Each accepted/dialled pair is detached from its
Python socket objects and handed, as two raw fds, to one relay thread that
splices bytes through pooled pipes in an epoll loop; the compiled build runs
that loop in C with the GIL released, so relayed bytes never enter Python.
The relay semantics (half-close with ``shutdown(SHUT_WR)``, an error on one leg
resets both) are the loop's own, see :mod:`kproxy._fastpath_splice_py`; ``abort_all``
and ``close`` are :mod:`kproxy._fastpath_relay_py`'s.

It can also take a whole listener (:meth:`SpliceRelay.listen`): the loop then
accepts, dials the next endpoint of a round robin Python keeps up to date
(:meth:`SpliceRelay.set_backends`) with upstream's retry schedule, and relays,
so a plain round-robin connection costs no Python at all. Failures come back as
events to the listener's handler (on the relay thread).

Invariants: ``active`` counts pairs handed over and not yet reported done by
the loop (updated under a lock, since the loop reports on its own thread), plus
the loop's own count of connections it accepted; after ``close()`` the loop
thread is gone and every fd it owned (listener copies included) is closed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kproxy.fastpath import RelayLoop
from kproxy.proxy.userspace.relay import reset_close

if TYPE_CHECKING:
    from kproxy._fastpath_py import RelayLoop as RelayLoopType

__all__ = ["EventHandler", "SpliceRelay"]

log = logging.getLogger(__name__)

# (kind, errno): a RelayLoop.EV_* event of one listener, called on the relay thread.
EventHandler = Callable[[int, int], None]


class SpliceRelay:
    """Relays pairs in one relay thread (compiled: C loop without the GIL)."""

    def __init__(
        self,
        *,
        pipe_size: int = 262144,
        force_copy: bool = False,
        max_pooled_pipes: int = 64,
        loop_factory: type[RelayLoopType] | None = None,
        dial_timeouts: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
        accept_pause: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        factory = loop_factory if loop_factory is not None else RelayLoop
        self._lock = threading.Lock()
        self._active = 0
        self._next_id = 0
        self.finished = 0
        self.aborted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._handlers: dict[int, EventHandler] = {}
        self._listener_ids = itertools.count(1)
        self.dial_timeouts = tuple(dial_timeouts)
        self._loop = factory(
            self._on_done,
            pipe_size=pipe_size,
            force_copy=force_copy,
            max_pooled_pipes=max_pooled_pipes,
            on_event=self._on_event,
            dial_timeouts=self.dial_timeouts,
            accept_pause=accept_pause,
        )

    @property
    def active(self) -> int:
        return self._active + int(self._loop.accepted_active)

    @property
    def closed(self) -> bool:
        return bool(self._loop.closed)

    def listen(self, sock: socket.socket, handler: EventHandler) -> int:
        """Accept, dial and relay ``sock``'s connections in the loop; a listener id.

        The loop gets its own copy of the fd; the caller keeps ``sock`` and closes
        it after :meth:`unlisten`. Connections are reset until :meth:`set_backends`.
        """
        lid = next(self._listener_ids)
        fd = os.dup(sock.fileno())
        self._handlers[lid] = handler
        try:
            self._loop.listen(fd, lid)
        except BaseException:
            self._handlers.pop(lid, None)
            os.close(fd)
            raise
        return lid

    def set_backends(self, lid: int, endpoints: Sequence[tuple[str, int]]) -> None:
        """The round robin (in this order) for connections the listener accepts next."""
        self._loop.set_backends(lid, endpoints)

    def unlisten(self, lid: int) -> None:
        """Stop accepting for ``lid`` (its later events are dropped); relayed pairs go on."""
        self._handlers.pop(lid, None)
        if not self._loop.closed:
            self._loop.unlisten(lid)

    def _on_event(self, lid: int, kind: int, err: int) -> None:
        # Runs on the relay thread.
        handler = self._handlers.get(lid)
        if handler is not None:
            handler(kind, err)

    def start(self, client: socket.socket, backend: socket.socket) -> None:
        """Hand the pair to the relay thread; never blocks on the data."""
        with contextlib.suppress(OSError):
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._loop.closed:
            reset_close(client)
            reset_close(backend)
            return
        with self._lock:
            self._active += 1
            self._next_id += 1
            cid = self._next_id
        # From here on the loop owns the fds; the socket objects must not close them.
        self._loop.add(client.detach(), backend.detach(), cid)

    def abort_all(self) -> None:
        if not self._loop.closed:
            self._loop.abort_all()

    def close(self) -> None:
        """Reset every pair and stop the relay thread (idempotent)."""
        self._loop.close()

    def stats(self) -> dict[str, int]:
        return self._loop.stats()

    def _on_done(self, conn_id: int, up: int, down: int, error: int) -> None:
        # Runs on the relay thread.
        with self._lock:
            self._active -= 1
            self.bytes_up += up
            self.bytes_down += down
            if error:
                self.aborted += 1
            else:
                self.finished += 1
        if error:
            log.debug(
                "relayed pair %d reset (errno %d) after %d/%d bytes", conn_id, error, up, down
            )
