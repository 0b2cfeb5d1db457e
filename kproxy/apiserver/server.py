"""The apiserver process: aiohttp app, TLS listener, authn/authz, bootstrap, compaction.

Owns :class:`ServerConfig` and :class:`ApiServer`: binding the secure port (TLS; client
certificates optional and verified against the client CA) and, only when asked, a
plain-HTTP port for tests and demos whose requests act as ``system:masters`` (as
upstream's old insecure port did), and on request a Unix socket for in-process clients
(:meth:`ApiServer.local_socket`, the same identity); the middleware that authenticates, maps every
failure to a ``Status`` body (an unexpected exception is logged and answered 500 —
that is a bug, never a verdict on the input); first-start bootstrap (the namespaces
``default``, ``kube-system``, ``kube-public``, ``kube-node-lease`` and allocator
repair from the stored Services); and periodic compaction of the store, keeping the
history of the last interval as kube-apiserver does.

Invariants: ``start`` returns once the ports are bound and bootstrap is done;
``stop`` ends open watches and releases the ports; it never closes the store (the
caller owns it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from kproxy.api import kinds
from kproxy.api.errors import ApiError
from kproxy.apiserver import authn, authz, certs, discovery
from kproxy.apiserver.allocators import ServiceAllocators
from kproxy.apiserver.authn import ClientCA, TokenFile, UserInfo
from kproxy.apiserver.handlers import ResourceHandler, parse_path
from kproxy.apiserver.registry import Registry, decode
from kproxy.store import AlreadyExists, Store

log = logging.getLogger(__name__)

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
INSECURE_USER = UserInfo("system:insecure", groups=(authz.MASTERS_GROUP, authn.AUTHENTICATED_GROUP))
MAX_BODY = 3 * 1024 * 1024
USER_KEY = web.RequestKey("user", UserInfo)


@dataclass
class ServerConfig:
    bind_address: str = "127.0.0.1"
    secure_port: int = 6443  # 0: OS-chosen
    insecure_port: int | None = None  # None: off
    insecure_bind_address: str = "127.0.0.1"
    service_cluster_ip_range: str = "10.96.0.0/12"
    service_node_port_range: tuple[int, int] = (30000, 32767)
    data_dir: Path | None = None
    tls_cert_file: Path | None = None
    tls_private_key_file: Path | None = None
    client_ca_file: Path | None = None
    token_auth_file: Path | None = None
    anonymous_auth: bool = True
    authorization: bool = True
    bookmark_interval: float = 5.0
    compaction_interval: float = 300.0  # 0: off
    extra_sans: list[str] = field(default_factory=list)


def _status_response(error: ApiError) -> web.Response:
    return web.Response(
        body=json.dumps(error.to_status()).encode(),
        status=error.code,
        headers={"Content-Type": "application/json"},
    )


class ApiServer:
    """One apiserver over ``store``. ``await start()``, then ``await stop()``."""

    def __init__(self, store: Store, config: ServerConfig | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.allocators = ServiceAllocators(
            store, self.config.service_cluster_ip_range, self.config.service_node_port_range
        )
        self.registry = Registry(store, self.allocators)
        self.policy = authz.RbacPolicy(authz.bootstrap_policy_objects())
        self.tokens: TokenFile | None = None
        self.client_ca: ClientCA | None = None
        self.pki: certs.Pki | None = None
        self.secure_port: int | None = None
        self.insecure_port: int | None = None
        self._handler = ResourceHandler(
            self.registry, self._authorize, bookmark_interval=self.config.bookmark_interval
        )
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._compactor: asyncio.Task[None] | None = None
        self._local_socket: Path | None = None

    # ------------------------------------------------------------------ urls

    @property
    def secure_url(self) -> str:
        return certs.server_url(_client_host(self.config.bind_address), self.secure_port or 0)

    @property
    def insecure_url(self) -> str:
        host = _client_host(self.config.insecure_bind_address)
        return (
            f"http://{host}:{self.insecure_port}"
            if ":" not in host
            else (f"http://[{host}]:{self.insecure_port}")
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        secure_sock = _bind(cfg.bind_address, cfg.secure_port)
        self.secure_port = secure_sock.getsockname()[1]
        insecure_sock = None
        if cfg.insecure_port is not None:
            insecure_sock = _bind(cfg.insecure_bind_address, cfg.insecure_port)
            self.insecure_port = insecure_sock.getsockname()[1]
        try:
            ssl_ctx = self._tls_context()
            await self.bootstrap()
            app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            app.on_shutdown.append(self._on_shutdown)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await self._runner.setup()
            await web.SockSite(self._runner, secure_sock, ssl_context=ssl_ctx).start()
            if insecure_sock is not None:
                await web.SockSite(self._runner, insecure_sock).start()
        except BaseException:
            secure_sock.close()
            if insecure_sock is not None:
                insecure_sock.close()
            if self._runner is not None:
                await self._runner.cleanup()
            raise
        if cfg.compaction_interval > 0:
            self._compactor = asyncio.create_task(self._compact_loop())
        log.info("apiserver serving on %s", self.secure_url)

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compactor
            self._compactor = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._local_socket is not None:
            shutil.rmtree(self._local_socket.parent, ignore_errors=True)
            self._local_socket = None

    async def local_socket(self) -> Path:
        """A Unix socket serving this apiserver to in-process clients
        (:class:`kproxy.client.inprocess.InProcessClient`); made on first use.

        Same app, middleware and handlers as the TCP ports, so validation, defaulting,
        admission and watch all apply. Its requests are plain HTTP and act as the insecure
        port's admin (upstream's loopback client is ``system:masters`` too); the guard is
        the private 0700 directory it lives in, removed again by :meth:`stop`.
        """
        if self._runner is None:
            raise RuntimeError("the apiserver is not running")
        if self._local_socket is None:
            path = Path(tempfile.mkdtemp(prefix="kproxy-apiserver-")) / "api.sock"
            try:
                await web.UnixSite(self._runner, str(path)).start()
            except BaseException:
                shutil.rmtree(path.parent, ignore_errors=True)
                raise
            self._local_socket = path
        return self._local_socket

    async def _on_shutdown(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        cert, key, ca = cfg.tls_cert_file, cfg.tls_private_key_file, cfg.client_ca_file
        if cfg.data_dir is not None:
            self.pki = certs.ensure_pki(
                cfg.data_dir,
                bind_address=cfg.bind_address,
                port=self.secure_port or 6443,
                extra_sans=cfg.extra_sans,
            )
            cert = cert or self.pki.serving_cert
            key = key or self.pki.serving_key
            ca = ca or self.pki.client_ca_file
            token_file: Path | None = cfg.token_auth_file or self.pki.token_file
        else:
            token_file = cfg.token_auth_file
        if cert is None or key is None:
            raise ValueError(
                "the secure port needs --tls-cert-file and --tls-private-key-file "
                "(or --data-dir to generate them)"
            )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        if ca is not None:
            ctx.load_verify_locations(str(ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
            self.client_ca = ClientCA.load(ca)
        if token_file is not None:
            self.tokens = TokenFile.load(token_file)
        return ctx

    async def bootstrap(self) -> None:
        """Create the system namespaces and rebuild allocations; idempotent."""
        ns_kind = kinds.by_resource("", "namespaces")
        for name in SYSTEM_NAMESPACES:
            try:
                await self.registry.create(ns_kind, "", {"metadata": {"name": name}})
            except ApiError as exc:
                if exc.code != 409:
                    raise
            except AlreadyExists:
                pass
        svc_kind = kinds.by_resource("", "services")
        kvs, _ = await self.store.list(f"/registry/{svc_kind.group_resource}/")
        await self.allocators.repair(decode(kv.value, kv.mod_revision) for kv in kvs)

    async def _compact_loop(self) -> None:
        # As kube-apiserver: compact to the revision seen one interval ago, so the last
        # interval of history stays watchable.
        previous: int | None = None
        while True:
            await asyncio.sleep(self.config.compaction_interval)
            try:
                current = await self.store.current_revision()
                if previous is not None and previous > 0:
                    await self.store.compact(previous)
                previous = current
            except Exception:
                log.exception("compaction failed")

    # ------------------------------------------------------------------ requests

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request[USER_KEY] = self._authenticate(request)
            result: web.StreamResponse = await handler(request)
            return result
        except ApiError as exc:
            return _status_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return _status_response(ApiError(413, "RequestEntityTooLarge", "request is too large"))
        except web.HTTPException as exc:
            return _status_response(ApiError(exc.status, exc.reason, exc.text or exc.reason))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("%s %s: unexpected error", request.method, request.path_qs)
            return _status_response(ApiError.internal(f"{type(exc).__name__}: {exc}"))
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _authenticate(self, request: web.Request) -> UserInfo:
        if not request.secure:
            return INSECURE_USER
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        try:
            user = authn.authenticate(
                request.headers,
                peer or None,
                tokens=self.tokens,
                client_ca=self.client_ca,
                anonymous=self.config.anonymous_auth,
            )
        except authn.AuthenticationError as exc:
            log.info("authentication failed for %s: %s", request.path, exc)
            raise ApiError.unauthorized("Unauthorized") from None
        if user.is_anonymous and not authn.allows_anonymous(request.path):
            raise ApiError.unauthorized("Unauthorized")
        return user

    async def _authorize(self, request: web.Request, attrs: authz.Attributes) -> None:
        if not self.config.authorization:
            return
        user = request[USER_KEY]
        decision = await authz.authorize_async(user, attrs, self.policy, self._pod_node)
        if not decision.allowed:
            raise ApiError.forbidden(
                f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource,
                attrs.name if attrs.verb not in ("create",) else "",
                decision.reason,
                attrs.api_group,
            )

    async def _pod_node(self, namespace: str, name: str) -> str | None:
        try:
            pod = await self.registry.get(kinds.by_resource("", "pods"), namespace, name)
        except ApiError:
            return None
        spec = pod.get("spec")
        return str(spec.get("nodeName") or "") if isinstance(spec, dict) else ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        target = parse_path(path)
        if target is not None:
            return await self._handler.handle(request, target)
        await self._authorize(
            request,
            authz.Attributes(
                verb="get" if request.method in ("GET", "HEAD") else request.method.lower(),
                path=path,
                resource_request=False,
            ),
        )
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on {path}")
        response = await discovery.handle_non_resource(request, path)
        if response is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return response


def _client_host(bind: str) -> str:
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind == "::":
        return "::1"
    return bind


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
