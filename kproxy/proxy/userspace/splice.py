"""The zero-copy relay: :class:`~.relay.Relay` on top of :class:`kproxy.fastpath.RelayLoop`.

Owns :class:`SpliceRelay`, a drop-in replacement for
:class:`~.relay.AsyncioRelay`. Each accepted/dialled pair is detached from its
Python socket objects and handed, as two raw fds, to one relay thread that
splices bytes through pooled pipes in an epoll loop; the compiled build runs
that loop in C with the GIL released, so relayed bytes never enter Python.
The relay semantics (half-close with ``shutdown(SHUT_WR)``, an error on one leg
resets both, ``abort_all``) are the loop's own; see
:mod:`kproxy._fastpath_relay_py`.

Invariants: ``active`` counts pairs handed over and not yet reported done by
the loop (updated under a lock, since the loop reports on its own thread);
after ``close()`` the loop thread is gone and every fd it owned is closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import TYPE_CHECKING

from kproxy.fastpath import RelayLoop
from kproxy.proxy.userspace.relay import reset_close

if TYPE_CHECKING:
    from kproxy._fastpath_py import RelayLoop as RelayLoopType

__all__ = ["SpliceRelay"]

log = logging.getLogger(__name__)


class SpliceRelay:
    """Relays pairs in one relay thread (compiled: C loop without the GIL)."""

    def __init__(
        self,
        *,
        pipe_size: int = 262144,
        force_copy: bool = False,
        max_pooled_pipes: int = 64,
        loop_factory: type[RelayLoopType] | None = None,
    ) -> None:
        factory = loop_factory if loop_factory is not None else RelayLoop
        self._lock = threading.Lock()
        self._active = 0
        self._next_id = 0
        self.finished = 0
        self.aborted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._loop = factory(
            self._on_done,
            pipe_size=pipe_size,
            force_copy=force_copy,
            max_pooled_pipes=max_pooled_pipes,
        )

    @property
    def active(self) -> int:
        return self._active

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
