"""Byte relays between an accepted client socket and a dialled backend socket.

Owns :class:`Relay`, the interface the TCP proxy socket hands connected pairs
to, and :class:`AsyncioRelay`, the pure-asyncio implementation. A compiled
relay (splice(2) through a pipe, GIL released) implements the same interface
and replaces it without touching the proxy sockets.

Invariants of every relay:

- it takes ownership of both sockets and closes each exactly once;
- a FIN in one direction becomes ``shutdown(SHUT_WR)`` on the other leg and the
  other direction keeps flowing (upstream closed both sockets on the first EOF,
  cutting off a client that half-closed and waited for its reply); the pair is
  closed when both directions are done;
- an error on either leg (reset, broken pipe) aborts the pair, resetting the
  other leg too (SO_LINGER 0), so a reset propagates instead of hanging;
- ``abort_all`` ends every relayed connection (mode shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Final, Protocol

__all__ = ["AsyncioRelay", "Relay", "reset_close"]

log = logging.getLogger(__name__)

BUFFER_SIZE: Final = 32 * 1024
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN ("refused at once" / propagate a reset)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


class Relay(Protocol):
    """Moves bytes between a client and a backend until both directions end."""

    def start(self, client: socket.socket, backend: socket.socket) -> None:
        """Take ownership of the connected, non-blocking pair and relay it.

        Called on the data-plane event loop; never blocks.
        """

    @property
    def active(self) -> int:
        """Pairs being relayed."""

    def abort_all(self) -> None:
        """Reset and close every pair being relayed."""


class _Aborted(Exception):
    """One leg failed; the pair is reset."""


class AsyncioRelay:
    """Two coroutines per pair on the running loop, with a reused buffer each."""

    def __init__(self, buffer_size: int = BUFFER_SIZE) -> None:
        self.buffer_size = buffer_size
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return len(self._tasks)

    def start(self, client: socket.socket, backend: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._run(client, backend))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def close(self) -> None:
        """Nothing of its own to release: its pairs are tasks of the data-plane loop."""

    async def _run(self, client: socket.socket, backend: socket.socket) -> None:
        pumps = [
            asyncio.create_task(self._pump(client, backend)),
            asyncio.create_task(self._pump(backend, client)),
        ]
        clean = False
        try:
            # Wait for both directions; the first failure aborts the pair.
            for fut in asyncio.as_completed(pumps):
                await fut
            clean = True
        except _Aborted:
            pass
        finally:
            for p in pumps:
                p.cancel()
            # Let the cancelled pumps unregister their readers before the fds close.
            await asyncio.gather(*pumps, return_exceptions=True)
            if clean:
                client.close()
                backend.close()
            else:
                reset_close(client)
                reset_close(backend)

    async def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray(self.buffer_size)
        view = memoryview(buf)
        try:
            while True:
                n = await loop.sock_recv_into(src, buf)
                if n == 0:
                    # Half-close: pass the FIN on, keep the other direction open.
                    dst.shutdown(socket.SHUT_WR)
                    return
                await loop.sock_sendall(dst, view[:n])
        except OSError as e:
            log.debug("relay leg ended with %s; resetting the pair", e)
            raise _Aborted from e
