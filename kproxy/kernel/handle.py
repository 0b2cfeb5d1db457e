"""The life cycle shared by kproxy's long-lived kernel handles and their fakes.

A handle owns one socket for its whole life (the proxy keeps one per family,
DESIGN.md §2): :meth:`Handle.close` is idempotent, and every handle is a
context manager.  Subclasses set ``_closed`` in ``__init__``;
:class:`SocketHandle` subclasses also set ``_sock``.  Fakes use :class:`Handle`
so that they close (and refuse use after close) exactly like the real ones.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self


class Handle:
    """Idempotent close and context management."""

    _closed: bool

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """What closing frees: nothing for a fake."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SocketHandle(Handle):
    """A handle owning the socket ``_sock``, closed with it."""

    _sock: Any

    def _release(self) -> None:
        self._sock.close()
