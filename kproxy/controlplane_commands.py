"""Flags and entry points of ``kproxy controller-manager`` and ``kproxy scheduler``.

Upstream's flag names where they exist (kube-controller-manager,
kube-scheduler); both talk to the apiserver only through a kubeconfig (or
``--master``), like every component but the apiserver itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import RestClient
from kproxy.controllers.manager import run_controller_manager
from kproxy.proxy.config import parse_duration
from kproxy.scheduler.scheduler import run_scheduler


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, help="kubeconfig of the apiserver")
    p.add_argument("--master", default=None, help="apiserver URL (overrides the kubeconfig)")


def add_controller_manager_flags(p: argparse.ArgumentParser) -> None:
    _client_flags(p)
    p.add_argument("--controllers", default="*", help="comma-separated list; '*', '-name'")
    p.add_argument("--cluster-cidr", default=None, help="pod CIDR(s) for node podCIDRs")
    p.add_argument(
        "--allocate-node-cidrs",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        nargs="?",
        const=True,
        default=True,
        help="assign spec.podCIDR to nodes from --cluster-cidr (default true)",
    )
    p.add_argument("--node-cidr-mask-size", type=int, default=24)
    p.add_argument("--node-cidr-mask-size-ipv6", type=int, default=64)
    p.add_argument("--node-monitor-grace-period", default="40s")
    p.add_argument("--node-monitor-period", default="5s")
    p.add_argument(
        "--default-not-ready-toleration-seconds",
        type=float,
        default=300.0,
        help="eviction delay for pods without a matching toleration",
    )
    p.add_argument("--max-endpoints-per-slice", type=int, default=100)
    p.add_argument("--concurrent-syncs", type=int, default=5)


def add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    _client_flags(p)
    p.add_argument("--scheduler-name", default="default-scheduler")


async def _until_sigterm(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until it ends or SIGTERM/SIGINT arrives; exit status."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main())
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


def run_controller_manager_command(args: argparse.Namespace) -> int:
    async def main() -> None:
        client = RestClient(load_kubeconfig(args.kubeconfig, master=args.master))
        await run_controller_manager(
            client,
            cluster_cidr=args.cluster_cidr if args.allocate_node_cidrs else None,
            node_cidr_mask_size=args.node_cidr_mask_size,
            node_cidr_mask_size_ipv6=args.node_cidr_mask_size_ipv6,
            node_monitor_grace_period=parse_duration(args.node_monitor_grace_period),
            node_monitor_period=parse_duration(args.node_monitor_period),
            default_toleration_seconds=args.default_not_ready_toleration_seconds,
            max_endpoints_per_slice=args.max_endpoints_per_slice,
            workers=args.concurrent_syncs,
            controllers=[c for c in args.controllers.split(",") if c],
        )

    return asyncio.run(_until_sigterm(main))


def run_scheduler_command(args: argparse.Namespace) -> int:
    async def main() -> None:
        client = RestClient(load_kubeconfig(args.kubeconfig, master=args.master))
        await run_scheduler(client, scheduler_name=args.scheduler_name)

    return asyncio.run(_until_sigterm(main))
