"""``kproxy/udp-echo``: answers each datagram with ``<pod> saw <ip>:<port>``.

Flags: ``--port`` (default ``$PORT`` or 9000). SIGTERM ends it with status 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from kproxy.images import pod_name


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="udp-echo")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9000")))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    name = pod_name()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.port))
    while True:
        _data, peer = sock.recvfrom(65535)
        sock.sendto(f"{name} saw {peer[0]}:{peer[1]}\n".encode(), peer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
