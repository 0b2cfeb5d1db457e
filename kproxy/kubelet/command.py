"""``kproxy kubelet``: flags (upstream kubelet names where they exist) → a running kubelet.

Owns :func:`build_parser`, :func:`config_from_args` and :func:`run` (``kproxy.cli`` wires
``build_parser`` + ``run(args)``; :func:`main` runs the module directly:
``python -m kproxy.kubelet.command``).

kproxy's own flags, for tests and one-machine clusters: ``--netns-prefix`` (pod
namespaces are ``<prefix><pod uid>``), ``--crash-backoff-initial``/``--crash-backoff-max``
(seconds, upstream's 10/300), ``--sync-tick`` (how often each pod worker looks at its
containers), ``--masquerade-pod-cidr``, ``--token-auth-file`` (bearer tokens accepted by
the kubelet API, the apiserver's format).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import RestClient
from kproxy.kubelet.kubelet import Kubelet, KubeletConfig
from kproxy.kubelet.node import NodeConfig, default_node_ip, parse_labels, parse_taints

log = logging.getLogger(__name__)


def _duration(text: str) -> float:
    """``10``, ``10s``, ``1m``, ``500ms``: seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * units[suffix]
            except ValueError:
                break
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, help="how to reach the apiserver")
    p.add_argument("--master", default=None, help="apiserver URL (overrides the kubeconfig)")
    p.add_argument("--hostname-override", default="", help="the node name (default: hostname)")
    p.add_argument("--register-node", type=_bool, default=True, nargs="?", const=True)
    p.add_argument("--node-labels", default="", help="key=value,... added to the Node")
    p.add_argument("--register-with-taints", default="", help="key[=value]:Effect,...")
    p.add_argument("--node-ip", default="", help="the node's InternalIP (and hostIP)")
    p.add_argument("--root-dir", default="/var/lib/kproxy/kubelet", type=Path)
    p.add_argument("--pod-cidr", default="", help="default: the Node's spec.podCIDR")
    p.add_argument("--bridge", default="kproxy0", help="the pod bridge's name")
    p.add_argument("--netns-prefix", default="kproxy-", help="pod netns = <prefix><uid>")
    p.add_argument("--address", default="0.0.0.0", help="the kubelet API's bind address")
    p.add_argument("--port", type=int, default=10250, help="the kubelet API's port (0: any)")
    p.add_argument("--tls-cert-file", type=Path, default=None)
    p.add_argument("--tls-private-key-file", type=Path, default=None)
    p.add_argument("--client-ca-file", type=Path, default=None)
    p.add_argument("--token-auth-file", type=Path, default=None)
    p.add_argument("--node-status-update-frequency", type=_duration, default=10.0)
    p.add_argument("--node-status-report-frequency", type=_duration, default=300.0)
    p.add_argument("--node-lease-duration-seconds", type=int, default=40)
    p.add_argument("--crash-backoff-initial", type=_duration, default=10.0)
    p.add_argument("--crash-backoff-max", type=_duration, default=300.0)
    p.add_argument("--sync-tick", type=_duration, default=0.5)
    p.add_argument("--masquerade-pod-cidr", action="store_true")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="kproxy kubelet", description=__doc__)
    add_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> KubeletConfig:
    name = (args.hostname_override or socket.gethostname()).strip().lower()
    node = NodeConfig(
        name=name,
        node_ip=args.node_ip or default_node_ip(),
        labels=parse_labels(args.node_labels),
        taints=parse_taints(args.register_with_taints),
        port=args.port,
        status_frequency=args.node_status_update_frequency,
        report_frequency=args.node_status_report_frequency,
        lease_duration=args.node_lease_duration_seconds,
        register=bool(args.register_node),
    )
    return KubeletConfig(
        node=node,
        root_dir=args.root_dir,
        pod_cidr=args.pod_cidr,
        bridge=args.bridge,
        netns_prefix=args.netns_prefix,
        address=args.address,
        tls_cert=args.tls_cert_file,
        tls_key=args.tls_private_key_file,
        client_ca=args.client_ca_file,
        token_file=args.token_auth_file,
        tick=args.sync_tick,
        backoff_initial=args.crash_backoff_initial,
        backoff_cap=args.crash_backoff_max,
        masquerade=args.masquerade_pod_cidr,
    )


async def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    client = RestClient(load_kubeconfig(args.kubeconfig, master=args.master))
    kubelet = Kubelet(client, cfg)
    task = asyncio.create_task(kubelet.run(), name="kubelet")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("kubelet stopping (pods keep running)")
    finally:
        await client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
