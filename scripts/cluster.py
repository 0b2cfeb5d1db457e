"""Bring up a whole kproxy cluster on this machine, inside network namespaces.

``sudo .venv/bin/python scripts/cluster.py [--nodes 2] [--proxy-mode iptables|userspace]``
starts a hub namespace with ``kproxy apiserver`` (SQLite), ``kproxy controller-manager``
and ``kproxy scheduler``, and N node namespaces each running ``kproxy kubelet`` and
``kproxy proxy`` (see ``tests/support/cluster.py``, which this wraps), prints how to
reach it with kubectl, and waits until Ctrl-C or SIGTERM; then everything is stopped
and every namespace it made is deleted. The host's own network namespace is never
touched.

:func:`cluster_up` is the same bring-up as a context manager, for ``scripts/demo.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``tests.support`` importable
    sys.path.insert(0, str(REPO))

from tests.support.cluster import Cluster, running_cluster  # noqa: E402

__all__ = ["cluster_up", "main"]


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the cleanup in ``finally`` runs.
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cluster_up(
    *,
    nodes: int = 2,
    proxy_mode: str = "iptables",
    workdir: Path | None = None,
    tag: str = "kpcluster",
) -> Iterator[Cluster]:
    """A running cluster of ``nodes`` nodes (``node-1``…); torn down on exit, always.

    Namespaces are named ``<tag>-<pid>-…``, so two bring-ups never collide."""
    if os.geteuid() != 0:
        raise SystemExit("cluster: needs root (it creates network namespaces)")
    # Ctrl-C too, even when started in the background with SIGINT ignored.
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    work = workdir or Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    try:
        with running_cluster(
            work,
            f"{tag}-{os.getpid()}-",
            nodes={f"node-{i}": {} for i in range(1, nodes + 1)},
            proxy_mode=proxy_mode,
        ) as cluster:
            yield cluster
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--proxy-mode", choices=("iptables", "userspace"), default="iptables")
    p.add_argument("--workdir", type=Path, default=None, help="logs, PKI, SQLite (default: tmp)")
    p.add_argument("--for", dest="seconds", type=float, default=0, help="stop after N s (0: ^C)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        with cluster_up(nodes=args.nodes, proxy_mode=args.proxy_mode, workdir=args.workdir) as c:
            print(f"cluster up in {time.monotonic() - t0:.1f}s; logs in {c.workdir}")
            for node in c.nodes.values():
                print(f"  {node.name}: netns {node.ns}, IP {node.ip}, podCIDR {node.pod_cidr}")
            print(
                "kubectl:\n"
                f"  nsenter --net=/run/netns/{c.hub} kubectl "
                f"--kubeconfig {c.admin_kubeconfig} get nodes -o wide\n"
                "Ctrl-C stops it and removes every namespace."
            )
            deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("cluster: stopped, namespaces removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
