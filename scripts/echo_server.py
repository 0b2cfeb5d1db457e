"""A tiny TCP/UDP echo "pod": answers each connection with its name and the peer it saw.

Used by the demo and the benchmarks until the kubelet's built-in images land.
Usage: echo_server.py NAME PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast


async def main(name: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        writer.write(f"{name} saw {peer[0]}:{peer[1]}\n".encode())
        await writer.drain()
        writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # asyncio's concrete datagram transport does not subclass
            # DatagramTransport on every Python, so cast rather than check.
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(f"{name} saw {addr[0]}:{addr[1]}\n".encode(), addr)

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Udp, local_addr=("0.0.0.0", port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
