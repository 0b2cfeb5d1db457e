"""Loopback TCP backends for the userspace proxy's unit tests (no namespaces needed).

:func:`backend` is a server that reads until the client half-closes, then answers
``<name> <bytes read>`` and closes: a test sees which backend a connection reached
and that every byte got through.
"""

from __future__ import annotations

import asyncio

__all__ = ["backend"]


async def backend(name: str) -> tuple[asyncio.Server, str]:
    """Reads until EOF (the client's half-close), then answers ``<name> <bytes>``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while chunk := await reader.read(65536):
            n += len(chunk)
        writer.write(f"{name} {n}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
