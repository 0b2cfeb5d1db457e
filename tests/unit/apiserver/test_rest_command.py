"""``kproxy apiserver`` flags and a start/stop cycle on OS-chosen loopback ports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kproxy.apiserver import command


def test_flags_map_to_config(tmp_path: Path) -> None:
    args = command.build_parser().parse_args(
        [
            "--data-dir",
            str(tmp_path),
            "--service-cluster-ip-range",
            "10.0.0.0/24",
            "--service-node-port-range",
            "31000-31010",
            "--insecure-port",
            "0",
            "--authorization-mode",
            "AlwaysAllow",
        ]
    )
    cfg = command.config_from_args(args)
    assert cfg.secure_port == 6443 and cfg.service_node_port_range == (31000, 31010)
    assert cfg.insecure_port == 0 and not cfg.authorization
    assert args.storage_backend == "sqlite"
    with pytest.raises(SystemExit):
        command.build_parser().parse_args(["--service-node-port-range", "9-1"])


def test_serve_writes_kubeconfig_and_stops(tmp_path: Path) -> None:
    args = command.build_parser().parse_args(
        ["--data-dir", str(tmp_path), "--secure-port", "0", "--insecure-port", "0"]
    )

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(command.serve(args, stop))
        kubeconfig = tmp_path / "admin.kubeconfig"
        for _ in range(100):
            if kubeconfig.exists() and (tmp_path / "kproxy.db").exists():
                break
            await asyncio.sleep(0.05)
        assert kubeconfig.exists()
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())

    # a second start reuses the data dir (sqlite state, CA)
    async def again() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(command.serve(args, stop))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(again())
