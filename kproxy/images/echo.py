"""``kproxy/echo``: an HTTP echo plus a TCP line echo, for Services to route to.

HTTP (``--http-port``, default ``$PORT`` or 8080):

- ``GET /`` (any other path too) → ``<pod> saw <ip>:<port>`` — the pod's name and the
  client address this pod saw (so tests can tell SNAT from no SNAT);
- ``GET /healthz`` → 200 ``ok``;
- ``GET /readyz`` and ``GET /livez`` → 200 while the flag is up, 503 once lowered;
- ``GET /control/ready/0|1`` and ``/control/live/0|1`` lower or raise those flags, so a
  test can make a probe fail without touching the pod's files.

TCP (``--tcp-port``, default 9000; 0 disables): each line received is sent back.

SIGTERM ends it with status 0. Threads, not asyncio: each request is tiny, and the
process must stay trivially simple to read.
"""

from __future__ import annotations

import argparse
import os
import signal
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kproxy.images import pod_name

FLAGS = {"ready": True, "live": True}


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "kproxy-echo/1"

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, "ok\n")
        elif path in ("/readyz", "/livez"):
            up = FLAGS["ready" if path == "/readyz" else "live"]
            self._reply(200 if up else 503, "ok\n" if up else "failing\n")
        elif path.startswith("/control/"):
            parts = path.strip("/").split("/")
            if len(parts) == 3 and parts[1] in FLAGS and parts[2] in ("0", "1"):
                FLAGS[parts[1]] = parts[2] == "1"
                self._reply(200, f"{parts[1]}={parts[2]}\n")
            else:
                self._reply(404, "unknown control\n")
        else:
            host, port = self.client_address[:2]
            self._reply(200, f"{pod_name()} saw {host}:{port}\n")

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class LineEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for _ in range(100_000):  # bounded: a connection echoes at most this many lines
            line = self.rfile.readline(65536)
            if not line:
                return
            self.wfile.write(line)


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echo")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--tcp-port", type=int, default=9000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    http = ThreadingHTTPServer(("0.0.0.0", args.http_port), EchoHandler)
    http.daemon_threads = True
    if args.tcp_port:
        tcp = TcpServer(("0.0.0.0", args.tcp_port), LineEcho)
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(f"echo {pod_name()}: http :{args.http_port} tcp :{args.tcp_port}", flush=True)
    http.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
