"""The ``kproxy proxy`` process: flags → a mode → the proxy loop, servers and source.

Owns the composition of one node proxy: which :class:`~kproxy.proxy.mode.Mode`
``--proxy-mode`` (and ``--userspace-datapath``) select and what is wired
around it (canary, UDP conntrack reconciler, health-check servers, closers);
the source (``--objects`` or the apiserver informers); the health and metrics
HTTP servers; and ``--cleanup``.  The sync loop itself is
:class:`kproxy.proxy.proxier.Proxier`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from aiohttp import web

from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import RestClient
from kproxy.errors import KProxyError
from kproxy.proxy.apisource import ApiServerSource
from kproxy.proxy.config import ConfigError, ProxyConfig
from kproxy.proxy.conntrack import ConntrackReconciler
from kproxy.proxy.core import ProxyCore, Snapshot
from kproxy.proxy.health import ProxyHealth, health_app
from kproxy.proxy.healthcheck import ServiceHealthServer
from kproxy.proxy.iptables.chains import RenderOptions
from kproxy.proxy.iptables.mode import DryRunIptablesMode, IptablesMode
from kproxy.proxy.iptables.options import HostFeatures, detect_host_features, render_options
from kproxy.proxy.ipvs.mode import IpvsMode
from kproxy.proxy.metrics import ProxyMetrics, metrics_app
from kproxy.proxy.nfqueue import NfqueueMode, nfqueue_options
from kproxy.proxy.nfqueue import cleanup_rules as cleanup_nfqueue_rules
from kproxy.proxy.proxier import NODE_WAIT_TIMEOUT, Proxier
from kproxy.proxy.sources import Handler, ObjectsFile
from kproxy.proxy.userspace import UserspaceMode, UserspaceOptions
from kproxy.proxy.userspace import cleanup_rules as cleanup_userspace_rules

__all__ = ["cleanup", "run_proxy"]

log = logging.getLogger(__name__)


def _render_options(cfg: ProxyConfig, core: ProxyCore, features: HostFeatures) -> RenderOptions:
    """The renderer's options from the flags and the Node known at startup."""
    return render_options(
        cfg,
        node_name=core.node_name,
        node_ips=core.node_ips(),
        features=features,
        topology_labels=core.topology_labels(core.node),
    )


@dataclass(slots=True)
class _BuiltMode:
    """A mode plus what the loop wires around it."""

    mode: IptablesMode | DryRunIptablesMode | UserspaceMode | IpvsMode | NfqueueMode
    canary: Callable[[], bool] | None = None
    after_sync: Callable[[Snapshot], object] | None = None
    health_checks: ServiceHealthServer | None = None
    close: Callable[[], None] | None = None


def _build_mode(
    cfg: ProxyConfig,
    core: ProxyCore,
    metrics: ProxyMetrics,
    health: ProxyHealth,
    *,
    dry_run: bool,
    out: TextIO,
) -> _BuiltMode:
    """The mode ``--proxy-mode`` asks for, with its canary, post-sync hook and closers."""
    if dry_run:
        if cfg.mode != "iptables":
            raise ConfigError(f"--dry-run is supported for the iptables mode, not {cfg.mode!r}")
        opts = _render_options(cfg, core, detect_host_features(None, cfg))
        # A dry run applies nothing, so it opens no health-check ports either.
        return _BuiltMode(DryRunIptablesMode(out, opts, metrics, sync_period=cfg.sync_period))
    from kproxy.kernel.conntrack import Conntrack
    from kproxy.kernel.iptables import Iptables

    backend: Any = cfg.iptables_backend
    ipt = Iptables("ipv4", backend)

    def reconciler() -> Callable[[Snapshot], object]:
        # Modes that DNAT in the kernel reconcile stale UDP flows after each sync.
        return ConntrackReconciler(Conntrack("ipv4"), metrics).after_sync

    if cfg.mode == "userspace" and cfg.userspace_datapath == "nfqueue":
        nfq_opts = nfqueue_options(cfg, core, random_fully=ipt.has_random_fully())
        nfq = NfqueueMode(ipt, nfq_opts, metrics)
        return _BuiltMode(nfq, canary=nfq.canary_present, after_sync=reconciler(), close=nfq.close)
    if cfg.mode == "userspace":
        mode = UserspaceMode(ipt, _userspace_options(cfg, core), metrics)
        # Client flows are NATed to the proxy's own port, never to endpoints, so
        # there is no conntrack to reconcile; sockets close, rules stay (upstream).
        return _BuiltMode(mode, canary=mode.canary_present, close=mode.close)
    if cfg.mode == "ipvs":
        ipvs_mode = _ipvs_mode(cfg, core, ipt, metrics)
        # Upstream's IPVS mode has no canary (its rule monitor is iptables-only).
        return _BuiltMode(
            ipvs_mode,
            after_sync=reconciler(),
            health_checks=ServiceHealthServer(
                health, tuple(str(ip) for ip in ipvs_mode.options.nodeport_ips or ())
            ),
            close=ipvs_mode.close,
        )
    opts = _render_options(cfg, core, detect_host_features(ipt, cfg))
    iptables_mode = IptablesMode(ipt, opts, metrics, sync_period=cfg.sync_period)
    return _BuiltMode(
        iptables_mode,
        canary=iptables_mode.canary_present,
        after_sync=reconciler(),
        health_checks=ServiceHealthServer(health, opts.nodeport_ips or ()),
    )


def _ipvs_mode(
    cfg: ProxyConfig,
    core: ProxyCore,
    ipt: Any,
    metrics: ProxyMetrics | None,
) -> IpvsMode:
    """The IPVS mode, its kernel handles opened on (and bound to) one worker thread."""
    from kproxy.kernel.ipset import Ipset
    from kproxy.kernel.ipvs import set_timeouts as set_ipvs_timeouts
    from kproxy.kernel.ipvs_batch import IpvsBatch
    from kproxy.kernel.links import Links
    from kproxy.proxy.ipvs import ipvs_options
    from kproxy.proxy.ipvs.mode import host_kernel_version

    # pyroute2 handles refuse other threads, and syncs run in asyncio's worker pool:
    # one dedicated thread opens the handles and runs every sync and the cleanup.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kproxy-ipvs")

    def build() -> IpvsMode:
        opened: list[Any] = []
        try:
            links = Links()
            opened.append(links)
            local = sorted(links.local_addresses("ipv4"), key=int)
            opts = ipvs_options(
                cfg,
                node_name=core.node_name,
                node_ips=(*core.node_ips(), *(str(a) for a in local)),
                topology_labels=core.topology_labels(core.node),
                random_fully=ipt.has_random_fully(),
                kernel_version=host_kernel_version(),
            )
            batch = IpvsBatch()
            opened.append(batch)
            ipset = Ipset()
            opened.append(ipset)
            return IpvsMode(
                batch,
                ipset,
                links,
                ipt,
                opts,
                metrics,
                verify_period=cfg.sync_period,
                executor=pool,
                set_timeouts=set_ipvs_timeouts,
            )
        except BaseException:
            for handle in opened:
                handle.close()
            raise

    try:
        return pool.submit(build).result()
    except KProxyError as e:
        pool.shutdown(wait=False)
        raise ConfigError(f"the ipvs proxy mode cannot run here: {e}") from e


def _userspace_options(cfg: ProxyConfig, core: ProxyCore) -> UserspaceOptions:
    try:
        listen = ipaddress.ip_address(cfg.bind_address or "0.0.0.0")
    except ValueError as exc:
        raise ConfigError(f"--bind-address: {exc}") from exc
    if listen.is_loopback:
        raise ConfigError("the userspace proxy cannot listen on a loopback --bind-address")
    node_ips = (*cfg.node_ips, *core.node_ips())
    host_ip = listen if not listen.is_unspecified else None
    if host_ip is None and node_ips:
        host_ip = ipaddress.ip_address(node_ips[0])
    if host_ip is None:
        raise ConfigError(
            "the userspace mode needs a node IP (--node-ip, --bind-address or the Node)"
        )
    return UserspaceOptions(
        host_ip=host_ip,
        listen_ip=listen,
        node_name=core.node_name,
        port_range=cfg.proxy_port_range,
        udp_timeout=cfg.udp_timeout,
        topology_labels=core.topology_labels(core.node),
        relay=cfg.userspace_relay,
        load_balancer=cfg.userspace_lb,
    )


def cleanup(cfg: ProxyConfig) -> int:
    """``kproxy proxy --cleanup``: remove every mode's rules (as upstream); exit status."""
    from kproxy.kernel.iptables import Iptables, IptablesError

    backend: Any = cfg.iptables_backend
    ipt = Iptables("ipv4", backend)
    # The mode that ran goes first: its jump rules reference chains the other
    # modes share (KUBE-SERVICES, KUBE-POSTROUTING...), which cannot go before them.
    status = _cleanup_ipvs(cfg, ipt) if cfg.mode == "ipvs" else 0
    try:
        IptablesMode(ipt, RenderOptions()).cleanup()
        cleanup_userspace_rules(ipt)
        cleanup_nfqueue_rules(ipt)
    except IptablesError as e:
        log.error("cleanup: %s", e)
        return 1
    if cfg.mode != "ipvs":
        status = _cleanup_ipvs(cfg, ipt)
    return status


def _cleanup_ipvs(cfg: ProxyConfig, ipt: Any) -> int:
    """IPVS leftovers after the iptables ones (the sets are referenced by rules until
    then). Upstream cleans IPVS whatever the mode when the kernel can; a kernel
    without IPVS or ipset is an error only in ipvs mode."""

    try:
        mode: IpvsMode = _ipvs_mode(cfg, ProxyCore(cfg.node_name()), ipt, None)
    except ConfigError as e:
        if cfg.mode == "ipvs":
            log.error("cleanup: %s", e)
            return 1
        log.debug("no IPVS cleanup: %s", e)
        return 0
    try:
        mode.cleanup()
    except KProxyError as e:
        log.error("cleanup: %s", e)
        return 1
    finally:
        mode.close()
    return 0


def _split_bind(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bind address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _serve(app: web.Application, address: str) -> web.AppRunner | None:
    if not address:
        return None
    host, port = _split_bind(address)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("serving on %s", address)
    return runner


async def run_proxy(cfg: ProxyConfig, *, dry_run: bool, out: TextIO) -> None:
    """``kproxy proxy``: follow ``--objects`` (or the apiserver of ``--kubeconfig`` /
    ``--master``) and program the kernel until cancelled."""
    if not cfg.objects and not cfg.kubeconfig and not cfg.master:
        raise ConfigError("kproxy proxy needs --objects FILE or --kubeconfig/--master")
    node_name = cfg.node_name()
    core = ProxyCore(node_name)
    if cfg.objects:
        source = ObjectsFile(cfg.objects, node_name)
        # Read once before building the options: the Node may supply the node IP.
        source.refresh(core)
        await _run_source(cfg, core, source, dry_run=dry_run, out=out)
        return
    async with RestClient(
        load_kubeconfig(cfg.kubeconfig or None, master=cfg.master or None)
    ) as client:
        api = ApiServerSource(client, node_name, resync_period=cfg.config_sync_period)
        try:
            api.start(core)
            # As the objects file's first read: the Node may supply the node IP. Bounded,
            # because a proxy without its Node still serves (upstream logs and goes on).
            if not await api.wait_node(NODE_WAIT_TIMEOUT) or core.node is None:
                log.warning("Node %r not found (yet); going on without its addresses", node_name)
            await _run_source(cfg, core, api, dry_run=dry_run, out=out)
        finally:
            await api.stop()


class _Source(Protocol):
    async def run(self, handler: Handler) -> None: ...


async def _run_source(
    cfg: ProxyConfig, core: ProxyCore, source: _Source, *, dry_run: bool, out: TextIO
) -> None:
    """The proxy process around a started ``source`` (see :func:`run_proxy`)."""
    metrics = ProxyMetrics()
    health = ProxyHealth(2 * cfg.sync_period)
    built = _build_mode(cfg, core, metrics, health, dry_run=dry_run, out=out)
    mode = built.mode
    proxier = Proxier(
        core,
        mode,
        health=health,
        metrics=metrics,
        sync_period=cfg.sync_period,
        min_sync_period=cfg.min_sync_period,
        canary=built.canary,
        on_topology=mode.set_topology_labels,
        after_sync=built.after_sync,
        health_checks=built.health_checks,
    )
    configz: Callable[[], Mapping[str, Any]] = cfg.as_configuration
    servers: list[web.AppRunner] = []
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    # SIGTERM ends the proxy like a cancel, but run_proxy then returns normally.
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        for app, address in (
            (health_app(health, metrics), cfg.healthz_bind_address),
            (metrics_app(metrics, cfg.mode, configz), cfg.metrics_bind_address),
        ):
            server = await _serve(app, address)
            if server is not None:
                servers.append(server)
        tasks = [
            asyncio.create_task(proxier.runner.loop(), name="sync-runner"),
            asyncio.create_task(source.run(core), name="source"),
            asyncio.create_task(proxier.canary_loop(), name="canary"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="sigterm")
        try:
            # A task that raises is a bug: surface it; otherwise wait for SIGTERM.
            waiting: set[asyncio.Task[Any]] = {*tasks, stopper}
            while stopper in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
        finally:
            stopper.cancel()
        log.info("SIGTERM: stopping the proxy")
    finally:
        proxier.runner.stop()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for server in servers:
            await server.cleanup()
        if built.health_checks is not None:
            await built.health_checks.close()
        if built.close is not None:
            await asyncio.to_thread(built.close)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)
        log.info("proxy stopped")
