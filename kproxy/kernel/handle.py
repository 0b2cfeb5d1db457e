"""The life cycle shared by kproxy's long-lived netlink handles.

A handle owns one socket for its whole life (the proxy keeps one per family,
DESIGN.md §2): :meth:`close` is idempotent, and the handle is a context
manager.  Subclasses set ``_sock`` and ``_closed`` in ``__init__``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self


class SocketHandle:
    """Idempotent close and context management for a handle owning ``_sock``."""

    _sock: Any
    _closed: bool

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
