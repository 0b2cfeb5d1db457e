"""Test-only driver: the userspace mode behind the real proxy loop, in the current netns.

Started by tests/netns/test_userspace_traffic.py with ``ip netns exec NODE``, so
every proxy socket and rule lives in the node namespace. It follows an objects
file (like ``kproxy proxy --objects``), syncs through :class:`Proxier` and its
runner, writes a JSON status file after every sync (syncs, ok, proxy ports,
relayed connections, UDP associations) and on SIGTERM runs ``mode.cleanup()``
and exits.

Usage: userspace_driver.py OBJECTS STATUS NODE HOST_IP BACKEND UDP_TIMEOUT
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from kproxy.kernel.iptables import Iptables
from kproxy.proxy.core import ProxyCore, Snapshot
from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.proxier import Proxier
from kproxy.proxy.sources import ObjectsFile
from kproxy.proxy.userspace.mode import UserspaceMode, UserspaceOptions


def write(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


async def main(argv: list[str]) -> None:
    objects, status_path, node, host_ip, backend, udp_timeout = argv
    status = Path(status_path)
    core = ProxyCore(node)
    source = ObjectsFile(objects, node, poll_interval=0.1)
    ipt = Iptables("ipv4", backend)  # type: ignore[arg-type]
    options = UserspaceOptions(
        host_ip=ipaddress.ip_address(host_ip), node_name=node, udp_timeout=float(udp_timeout)
    )
    mode = UserspaceMode(ipt, options, ProxyMetrics())
    syncs = 0

    def after_sync(_: Snapshot) -> None:
        nonlocal syncs
        syncs += 1
        last = proxier.syncs[-1]
        write(status, {"syncs": syncs, "ok": last.ok, "error": last.error, **mode.stats()})

    proxier = Proxier(
        core,
        mode,
        health=ProxyHealth(60),
        metrics=ProxyMetrics(),
        sync_period=2.0,
        min_sync_period=0.05,
        after_sync=after_sync,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [
        asyncio.create_task(proxier.runner.loop()),
        asyncio.create_task(source.run(core)),
    ]
    try:
        await stop.wait()
    finally:
        proxier.runner.stop()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        mode.cleanup()
        write(status, {"syncs": syncs, "cleaned": True})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1:]))
