"""The only composition root: flags and config → wired components.

Commands:
- ``kproxy version`` — version and which fast path is in use;
- ``kproxy render iptables|ipvs --objects FILE`` — the restore input a full
  sync would write (ipvs: virtual/real servers, ipsets and rules), without root
  and without touching the kernel (host features are detected unless
  ``--host-features`` is given);
- ``kproxy apiserver`` — the apiserver (SQLite by default, or etcd), see
  :mod:`kproxy.apiserver.command`;
- ``kproxy controller-manager`` and ``kproxy scheduler`` — see
  :mod:`kproxy.controlplane_commands`;
- ``kproxy kubelet`` — the node agent (pods as processes in their own netns);
- ``kproxy proxy`` — the node proxy (``--objects FILE`` or ``--kubeconfig``),
  with ``--dry-run`` to print each sync instead of applying it, and
  ``--cleanup`` to remove everything the mode created;
- ``kproxy cluster up`` — all of the above as a whole cluster on this machine, in
  network namespaces, until Ctrl-C/SIGTERM (``cluster down PREFIX`` removes what a
  killed one left), see :mod:`kproxy.localcluster.command`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

from kproxy import __version__, controlplane_commands, fastpath
from kproxy.apiserver import command as apiserver_command
from kproxy.errors import KProxyError
from kproxy.kubelet import command as kubelet_command
from kproxy.localcluster import command as cluster_command
from kproxy.proxy.config import add_flags, from_args
from kproxy.proxy.iptables.options import HostFeatures, detect_host_features, render_options

log = logging.getLogger("kproxy")

RENDER_FLAGS = (
    "--hostname-override",
    "--node-ip",
    "--bind-address",
    "--cluster-cidr",
    "--masquerade-all",
    "--iptables-masquerade-bit",
    "--iptables-localhost-nodeports",
    "--nodeport-addresses",
    "--objects",
    "--ipvs-scheduler",
    "--ipvs-exclude-cidrs",
    "--ipvs-strict-arp",
)


def cmd_render(args: argparse.Namespace) -> int:
    from kproxy.proxy.core import ProxyCore
    from kproxy.proxy.iptables.render import IPTablesRenderer
    from kproxy.proxy.sources import ObjectsFile

    cfg = from_args(args)
    if not cfg.objects:
        raise KProxyError("render needs --objects FILE")
    name = cfg.node_name()
    core = ProxyCore(name)
    source = ObjectsFile(cfg.objects, name)
    if source.refresh(core) < 0:
        raise KProxyError(f"cannot use --objects {cfg.objects}")
    snap = core.snapshot()
    if args.host_features is not None:
        features = HostFeatures.parse(args.host_features)
    else:
        from kproxy.kernel.iptables import Iptables

        features = detect_host_features(Iptables("ipv4"), cfg)
    if args.render_mode == "ipvs":
        from kproxy.proxy.ipvs import render_ipvs

        sys.stdout.write(
            render_ipvs(
                cfg,
                snap.services,
                snap.endpoints,
                node_name=name,
                node_ips=core.node_ips(),
                topology_labels=core.topology_labels(core.node),
                random_fully=features.random_fully,
            )
        )
        return 0
    options = render_options(
        cfg,
        node_name=name,
        node_ips=core.node_ips(),
        features=features,
        topology_labels=core.topology_labels(core.node),
    )
    result = IPTablesRenderer(options).render(snap.services, snap.endpoints, full=True)
    sys.stdout.write(result.text)
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    print(f"kproxy {__version__} (fast path: {fastpath.IMPLEMENTATION})")
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    from kproxy.proxy import daemon

    cfg = from_args(args)
    if args.cleanup:
        return daemon.cleanup(cfg)
    if not cfg.objects and not cfg.kubeconfig and not cfg.master:
        raise KProxyError("the proxy needs --objects FILE or --kubeconfig/--master")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(daemon.run_proxy(cfg, dry_run=args.dry_run, out=sys.stdout))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kproxy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("version", help="print the version and the fast path in use")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("render", help="print the rules a full sync would write")
    p.add_argument("render_mode", choices=["iptables", "ipvs"])
    add_flags(p, RENDER_FLAGS)
    p.add_argument(
        "--host-features",
        default=None,
        help="comma-separated subset of random-fully,nfacct,tcp-be-liberal for a dry run "
        "('' = none); detected on this host when omitted",
    )
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("apiserver", help="run the Kubernetes-compatible apiserver")
    apiserver_command.add_flags(p)
    p.set_defaults(func=apiserver_command.run)

    p = sub.add_parser("controller-manager", help="run the controllers")
    controlplane_commands.add_controller_manager_flags(p)
    p.set_defaults(func=controlplane_commands.run_controller_manager_command)

    p = sub.add_parser("scheduler", help="run the scheduler")
    controlplane_commands.add_scheduler_flags(p)
    p.set_defaults(func=controlplane_commands.run_scheduler_command)

    p = sub.add_parser("kubelet", help="run the node agent: pods as processes in netns")
    kubelet_command.add_flags(p)
    p.set_defaults(func=lambda a: asyncio.run(kubelet_command.run(a)))

    p = sub.add_parser("proxy", help="run the node proxy")
    add_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print each sync, apply nothing")
    p.add_argument("--cleanup", action="store_true", help="remove kproxy's rules and exit")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser("cluster", help="a whole cluster on this machine, in network namespaces")
    cluster_command.add_flags(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except KProxyError as exc:
        print(f"kproxy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
