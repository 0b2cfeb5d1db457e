"""The kubelet's own HTTP(S) API on ``--port`` (10250): healthz, pods, container logs.

Owns :class:`KubeletServer` and the :class:`PodsView` it serves from. Endpoints (the
subset of upstream's ``pkg/kubelet/server`` that kubectl and tests use):

- ``GET /healthz`` → ``ok`` (anonymous allowed, as upstream);
- ``GET /pods`` → a ``PodList`` of this node's pods with the status the kubelet computes;
- ``GET /containerLogs/{namespace}/{pod}/{container}`` (``?previous=true``,
  ``?tailLines=N``) → the container's log as text.

Authentication, the apiserver's way: with ``--client-ca-file`` the TLS layer verifies
client certificates against the cluster CA (any CN it signed is accepted, as the
apiserver authenticates it), and with a token file (``token,user,uid[,groups]``
CSV lines, the apiserver's ``--token-auth-file``) a listed bearer token is accepted.
When neither is configured the API is open (plain HTTP for tests). Authorization is
not modelled: an authenticated user may read everything here.
"""

from __future__ import annotations

import csv
import io
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger(__name__)
Obj = dict[str, Any]
ANONYMOUS_PATHS = frozenset({"/healthz"})


class PodsView(Protocol):
    def pod_list(self) -> list[Obj]: ...
    def log_file(self, namespace: str, pod: str, container: str, previous: bool) -> Path | None: ...


def load_tokens(path: Path) -> set[str]:
    tokens: set[str] = set()
    for record in csv.reader(io.StringIO(path.read_text()), skipinitialspace=True):
        if len(record) >= 3 and record[0].strip():
            tokens.add(record[0].strip())
    return tokens


def server_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        # Optional: a request may authenticate with a token instead of a cert.
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class KubeletServer:
    def __init__(
        self,
        view: PodsView,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        client_ca: bool = False,
        tokens: set[str] | None = None,
    ) -> None:
        self.view = view
        self.host, self.port = host, port
        self._ssl = ssl_context
        self._client_ca = client_ca
        self._tokens = tokens or set()
        self._runner: web.AppRunner | None = None
        self.bound_port = 0

    def _authenticated(self, request: web.Request) -> bool:
        if not self._client_ca and not self._tokens:
            return True
        if self._client_ca and request.transport is not None:
            peer = request.transport.get_extra_info("peercert")
            if isinstance(peer, Mapping) and peer:
                return True  # verified by the TLS layer against the cluster CA
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self._tokens

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in ANONYMOUS_PATHS and not self._authenticated(request):
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/pods", self._pods)
        app.router.add_get("/pods/", self._pods)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("kubelet API on %s:%d (%s)", self.host, self.bound_port,
                 "https" if self._ssl else "http")  # fmt: skip

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _pods(self, _: web.Request) -> web.Response:
        body = {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": self.view.pod_list(),
        }
        return web.json_response(body)

    async def _logs(self, request: web.Request) -> web.Response:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        previous = request.query.get("previous") in ("true", "1")
        path = self.view.log_file(ns, pod, container, previous)
        if path is None:
            msg = f'container "{container}" in pod "{pod}" not found in namespace "{ns}"'
            if previous:
                msg = f'previous terminated container "{container}" in pod "{pod}" not found'
            return web.json_response(_status(404, "NotFound", msg), status=404)
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        tail = request.query.get("tailLines")
        if tail and tail.isdigit():
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail) :]) if int(tail) else b""
        return web.Response(body=data, content_type="text/plain", charset="utf-8")


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip
