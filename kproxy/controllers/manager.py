"""The controller manager: build every registered controller, start informers, run them.

Owns :func:`load_controllers` (imports every module of :mod:`kproxy.controllers`, which
is how controllers register themselves) and :func:`run_controller_manager`.

Invariants: handlers are wired (factories run) before any informer starts; one
controller crashing is logged and does not stop the others; cancelling the manager
stops every controller and informer before it returns.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
import time
from collections.abc import Iterable, Mapping
from typing import Any

import kproxy.controllers as package
from kproxy.client.rest import RestClient
from kproxy.controllers import (
    CONTROLLERS,
    Clock,
    Controller,
    ControllerContext,
    ControllerOptions,
    SharedInformers,
)
from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

_NOT_CONTROLLERS = {"manager", "workqueue"}


def load_controllers() -> dict[str, Any]:
    """Import every controller module so its ``@register`` runs; the registry."""
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_CONTROLLERS and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(CONTROLLERS)


def build_controllers(
    ctx: ControllerContext, enabled: Iterable[str] | None = None
) -> list[Controller]:
    """Controllers named in ``enabled`` (upstream's ``--controllers``: ``*``, ``-name``)."""
    registry = load_controllers()
    wanted = list(enabled or ["*"])
    names = set(registry) if "*" in wanted else set()
    for item in wanted:
        if item.startswith("-"):
            names.discard(item[1:])
        elif item != "*":
            if item not in registry:
                raise ValueError(f"unknown controller {item!r}; known: {sorted(registry)}")
            names.add(item)
    out: list[Controller] = []
    for name in sorted(names):
        controller = registry[name](ctx)
        if controller is None:
            log.info("controller %s disabled by its options", name)
            continue
        out.append(controller)
    return out


async def run_controller_manager(
    client: RestClient,
    *,
    cluster_cidr: str | None = None,
    node_cidr_mask_size: int = 24,
    node_cidr_mask_size_ipv6: int = 64,
    node_monitor_grace_period: float = 40.0,
    node_monitor_period: float = 5.0,
    default_toleration_seconds: float = 300.0,
    max_endpoints_per_slice: int = 100,
    workers: int = 5,
    controllers: Iterable[str] | None = None,
    resync_period: float | None = None,
    clock: Clock = time.time,
    extra: Mapping[str, Any] | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run the enabled controllers until cancelled (``started`` is set once all run)."""
    if not 1 <= max_endpoints_per_slice <= 1000:
        raise ValueError("--max-endpoints-per-slice must be within 1..1000")
    options = ControllerOptions(
        cluster_cidr=cluster_cidr,
        node_cidr_mask_size=node_cidr_mask_size,
        node_cidr_mask_size_ipv6=node_cidr_mask_size_ipv6,
        node_monitor_grace_period=node_monitor_grace_period,
        node_monitor_period=node_monitor_period,
        default_toleration_seconds=default_toleration_seconds,
        max_endpoints_per_slice=max_endpoints_per_slice,
        workers=workers,
        clock=clock,
        extra=dict(extra or {}),
    )
    informers = SharedInformers(client, resync_period=resync_period)
    ctx = ControllerContext(client, informers, options)
    running = build_controllers(ctx, controllers)
    informers.start()
    tasks = {asyncio.create_task(c.run(), name=f"controller:{c.name}"): c.name for c in running}
    log.info("controller manager: running %s", ", ".join(sorted(tasks.values())) or "nothing")
    if started is not None:
        started.set()
    try:
        if not tasks:
            await asyncio.Event().wait()  # nothing enabled: idle until cancelled
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                log.error("controller %s stopped", tasks[task], exc_info=exc)
        raise KProxyError("every controller stopped")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await informers.stop()


__all__ = ["build_controllers", "load_controllers", "run_controller_manager"]
