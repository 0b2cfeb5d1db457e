"""``kproxy apiserver``: flags (upstream kube-apiserver names) → a running apiserver.

Owns :func:`add_flags`, :func:`config_from_args`, :func:`open_store` and :func:`run`
(and :func:`main` for running the module directly). ``kproxy.cli`` wires it as
``build_parser`` + ``run(args)``.

Storage: ``--storage-backend sqlite`` (default; ``<data-dir>/kproxy.db``), ``memory``
(nothing survives a restart) or ``etcd3`` (``--etcd-servers``). With ``--data-dir``
the CA, serving and admin certificates and the admin token are created on first
start, and ``<data-dir>/admin.kubeconfig`` is written. The plain-HTTP port is off
unless ``--insecure-port`` is given (kproxy's own flag, for tests and demos: its
requests act as cluster admin).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from kproxy.apiserver.server import ApiServer, ServerConfig
from kproxy.errors import KProxyError
from kproxy.store import MemoryStore, SqliteStore, Store

log = logging.getLogger(__name__)


def _port_range(text: str) -> tuple[int, int]:
    try:
        lo_text, _, hi_text = text.partition("-")
        lo, hi = int(lo_text), int(hi_text or lo_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r}") from None
    if not 0 < lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r}")
    return lo, hi


def _duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``1h``: seconds (kube-apiserver's Go durations, simply)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-backend", choices=("sqlite", "memory", "etcd3"), default="sqlite"
    )
    parser.add_argument("--etcd-servers", default="", help="comma-separated etcd URLs")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="SQLite file, CA, certs, tokens"
    )
    parser.add_argument("--bind-address", default="127.0.0.1")
    parser.add_argument("--secure-port", type=int, default=6443)
    parser.add_argument("--insecure-port", type=int, default=None, help="plain HTTP (tests/demo)")
    parser.add_argument("--insecure-bind-address", default="127.0.0.1")
    parser.add_argument("--advertise-address", default=None)
    parser.add_argument("--service-cluster-ip-range", default="10.96.0.0/12")
    parser.add_argument("--service-node-port-range", type=_port_range, default=(30000, 32767))
    parser.add_argument("--token-auth-file", type=Path, default=None)
    parser.add_argument("--client-ca-file", type=Path, default=None)
    parser.add_argument("--tls-cert-file", type=Path, default=None)
    parser.add_argument("--tls-private-key-file", type=Path, default=None)
    parser.add_argument("--anonymous-auth", default="true", choices=("true", "false"))
    parser.add_argument(
        "--authorization-mode", default="Node,RBAC", help="Node,RBAC (default) or AlwaysAllow"
    )
    parser.add_argument("--etcd-compaction-interval", type=_duration, default=300.0)
    parser.add_argument("--watch-bookmark-interval", type=_duration, default=5.0)
    parser.add_argument("-v", "--v", dest="verbosity", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kproxy apiserver", description=__doc__)
    add_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.data_dir is None and (args.tls_cert_file is None or args.tls_private_key_file is None):
        raise KProxyError("give --data-dir, or --tls-cert-file and --tls-private-key-file")
    sans = [args.advertise_address] if args.advertise_address else []
    return ServerConfig(
        bind_address=args.bind_address,
        secure_port=args.secure_port,
        insecure_port=args.insecure_port,
        insecure_bind_address=args.insecure_bind_address,
        service_cluster_ip_range=args.service_cluster_ip_range,
        service_node_port_range=args.service_node_port_range,
        data_dir=args.data_dir,
        tls_cert_file=args.tls_cert_file,
        tls_private_key_file=args.tls_private_key_file,
        client_ca_file=args.client_ca_file,
        token_auth_file=args.token_auth_file,
        anonymous_auth=args.anonymous_auth == "true",
        authorization="AlwaysAllow" not in args.authorization_mode.split(","),
        bookmark_interval=args.watch_bookmark_interval,
        compaction_interval=args.etcd_compaction_interval,
        extra_sans=sans,
    )


def _etcd_endpoints(text: str) -> list[str]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parsed = urlparse(item if "://" in item else f"http://{item}")
        if not parsed.hostname or not parsed.port:
            raise KProxyError(f"--etcd-servers: not host:port: {item!r}")
        out.append(f"{parsed.hostname}:{parsed.port}")
    return out


async def open_store(args: argparse.Namespace) -> Store:
    if args.storage_backend == "memory":
        return MemoryStore()
    if args.storage_backend == "etcd3":
        endpoints = _etcd_endpoints(args.etcd_servers)
        if not endpoints:
            raise KProxyError("--storage-backend etcd3 needs --etcd-servers")
        from kproxy.store.etcd import EtcdStore

        return await EtcdStore.connect(endpoints)
    if args.data_dir is None:
        raise KProxyError("--storage-backend sqlite needs --data-dir")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    return await SqliteStore.open(args.data_dir / "kproxy.db")


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM)."""
    config = config_from_args(args)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    store = await open_store(args)
    try:
        server = ApiServer(store, config)
        await server.start()
        try:
            if server.pki is not None:
                log.info("admin kubeconfig: %s", server.pki.admin_kubeconfig)
            if server.insecure_port is not None:
                log.info("insecure (admin) HTTP on %s", server.insecure_url)
            await stop.wait()
        finally:
            await server.stop()
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbosity >= 4 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(args))
    except (KProxyError, OSError, ValueError) as exc:
        log.error("apiserver: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
