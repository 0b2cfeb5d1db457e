"""``kproxy cluster up|down``: a local cluster from the command line.

``kproxy cluster up`` brings up a hub namespace (apiserver on SQLite,
controller-manager, scheduler) and N node namespaces (kubelet + proxy) with
:func:`cluster_up`, prints how to reach the apiserver, and stays up until Ctrl-C,
SIGTERM or SIGHUP (or ``--for`` seconds); then it stops every process and deletes
every namespace it made. ``kproxy cluster down PREFIX`` removes what a cluster that
was killed outright (SIGKILL) left behind.

Invariants: the first stop signal turns into KeyboardInterrupt so the cleanup in
``finally`` runs; later ones are ignored until that cleanup is done, so a second
Ctrl-C cannot cut it short (each of its steps is bounded). Namespaces are named
``<name>-<pid>-…``: two bring-ups never collide.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Final

from kproxy.kernel.clusternet import (
    MAX_NODES,
    Topology,
    check_prefix,
    check_prerequisites,
)
from kproxy.localcluster.cluster import Cluster, running_cluster
from kproxy.localcluster.errors import ClusterError

__all__ = ["PROXY_MODES", "add_flags", "cluster_up"]

# kproxy proxy's modes (kproxy.proxy.config.MODES; a unit test keeps them equal). Not
# imported: the local cluster drives the components as processes, never as code.
PROXY_MODES: Final = ("iptables", "ipvs", "userspace")
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopOnce:
    """A signal handler: the first signal raises KeyboardInterrupt, later ones wait."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return  # the teardown is running; let it finish
        self.stopping = True
        raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cluster_up(
    *,
    nodes: int = 2,
    proxy_mode: str = "iptables",
    iptables_backend: str = "nft",
    workdir: Path | None = None,
    name: str = "kpcluster",
) -> Iterator[Cluster]:
    """A running cluster of ``nodes`` nodes (``node-1``…), torn down on exit, always.

    Namespaces are ``<name>-<pid>-hub``, ``<name>-<pid>-node-N`` (and the pods'),
    logs, PKI and the SQLite data go to ``workdir`` (default: a new temporary
    directory, kept afterwards). SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt
    while it runs (even when started in the background with SIGINT ignored)."""
    if not 1 <= nodes <= MAX_NODES:
        raise ClusterError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    check_prefix(name)
    handler = _StopOnce()
    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        work = workdir or Path(tempfile.mkdtemp(prefix=f"{name}-"))
        with running_cluster(
            work,
            f"{name}-{os.getpid()}-",
            nodes={f"node-{i}": {} for i in range(1, nodes + 1)},
            proxy_mode=proxy_mode,
            iptables_backend=iptables_backend,
        ) as cluster:
            yield cluster
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def describe(c: Cluster, elapsed: float) -> str:
    """What a user needs to reach the cluster (the apiserver lives inside the hub)."""
    enter = f"nsenter --net=/run/netns/{c.hub}"
    lines = [
        f"kproxy cluster: up in {elapsed:.1f}s, proxy mode {c.proxy_mode}; "
        f"logs, PKI and data under {c.workdir}",
        f"  hub     netns {c.hub}: apiserver {c.apiserver_url}, controller-manager, scheduler",
    ]
    for node in c.nodes.values():
        lines.append(
            f"  {node.name:7} netns {node.ns}: IP {node.ip}, podCIDR {node.pod_cidr}, "
            f"kubelet + proxy"
        )
    lines += [
        f"admin kubeconfig: {c.admin_kubeconfig}",
        "The apiserver's address exists only inside the cluster's namespaces (the host's",
        "own network namespace is left untouched), so run clients from the hub:",
        f"  {enter} kubectl --kubeconfig {c.admin_kubeconfig} get nodes -o wide",
        "(any client works with that kubeconfig from there: the official Python client,",
        "kproxy's own).",
        "Ctrl-C or SIGTERM stops it and removes every namespace and process it made",
        f"(after a SIGKILL: kproxy cluster down {c.prefix}).",
    ]
    return "\n".join(lines)


def run_up(args: argparse.Namespace) -> int:
    check_prerequisites(args.iptables_backend)  # before saying anything is coming up
    print(
        f"kproxy cluster: bringing up a hub and {args.nodes} node(s) "
        f"(proxy mode {args.proxy_mode})...",
        flush=True,
    )
    t0 = time.monotonic()
    work: Path | None = None
    try:
        with cluster_up(
            nodes=args.nodes,
            proxy_mode=args.proxy_mode,
            iptables_backend=args.iptables_backend,
            workdir=args.workdir,
            name=args.name,
        ) as c:
            work = c.workdir
            print(describe(c, time.monotonic() - t0), flush=True)
            deadline = time.monotonic() + args.duration if args.duration > 0 else None
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    kept = f"; logs kept in {work}" if work is not None else ""
    print(f"kproxy cluster: stopped, every namespace and process it made removed{kept}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    topology = Topology(args.prefix)
    topology.adopt()
    problems = topology.destroy()
    if problems:
        raise ClusterError("; ".join(problems))
    print(f"kproxy cluster: removed every {args.prefix}* namespace and what ran inside")
    return 0


def _node_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_NODES}")
    return value


def add_flags(p: argparse.ArgumentParser) -> None:
    """``kproxy cluster``'s subcommands and their flags (each sets ``func``)."""
    sub = p.add_subparsers(dest="cluster_command", required=True, metavar="{up,down}")
    up = sub.add_parser(
        "up",
        help="run a local cluster in network namespaces until Ctrl-C/SIGTERM (root)",
        description="Bring up a hub namespace (apiserver on SQLite, controller-manager, "
        "scheduler) and N node namespaces (kubelet + proxy) on this machine, print how to "
        "reach them, and remove every namespace and process made on Ctrl-C or SIGTERM. "
        "The host's own network namespace is never changed.",
    )
    up.add_argument(
        "--nodes", type=_node_count, default=2, metavar="N", help="node count (default 2)"
    )
    up.add_argument("--proxy-mode", choices=PROXY_MODES, default="iptables")
    up.add_argument("--iptables-backend", choices=("nft", "legacy"), default="nft")
    up.add_argument(
        "--name", default="kpcluster", help="namespace name stem: NAME-PID-hub, NAME-PID-node-N"
    )
    up.add_argument(
        "--workdir", type=Path, default=None, help="logs, PKI, SQLite (default: a new tmp dir)"
    )
    up.add_argument(
        "--for",
        dest="duration",
        type=float,
        default=0,
        metavar="SECONDS",
        help="stop after this long (default 0: run until Ctrl-C/SIGTERM)",
    )
    up.set_defaults(func=run_up)
    down = sub.add_parser(
        "down", help="remove what a killed `cluster up` left (its namespaces and processes)"
    )
    down.add_argument("prefix", help="the namespace prefix `cluster up` printed (NAME-PID-)")
    down.set_defaults(func=run_down)
