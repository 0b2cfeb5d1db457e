"""/healthz, /livez, /metrics and /proxyMode answer as upstream's do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kproxy.proxy.health import ProxyHealth, go_time, health_app
from kproxy.proxy.metrics import ProxyMetrics, metrics_app


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


class Served:
    """Serve an app on a private event loop for the length of one test."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = TestClient(TestServer(app, loop=self.loop), loop=self.loop)
        self.loop.run_until_complete(self.client.start_server())

    async def _get(self, path: str) -> tuple[int, dict[str, str], str]:
        resp = await self.client.get(path)
        return resp.status, dict(resp.headers), await resp.text()

    def __call__(self, path: str) -> tuple[int, dict[str, str], str]:
        return self.loop.run_until_complete(self._get(path))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


_served: list[Served] = []


def get(app: web.Application, path: str) -> tuple[int, dict[str, str], str]:
    for served in _served:
        if served.client.server.app is app:
            return served(path)
    served = Served(app)
    _served.append(served)
    return served(path)


@pytest.fixture(autouse=True)
def _close_servers() -> Iterator[None]:
    yield
    while _served:
        _served.pop().close()


def test_go_time_format() -> None:
    assert go_time(0.0) == "1970-01-01 00:00:00 +0000 UTC"
    assert go_time(1_700_000_000.25) == "2023-11-14 22:13:20.25 +0000 UTC"


def test_healthy_while_starting_and_after_sync() -> None:
    clock = Clock()
    health = ProxyHealth(health_timeout=60.0, clock=clock)
    metrics = ProxyMetrics()
    app = health_app(health, metrics)
    code, headers, text = get(app, "/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    body: dict[str, Any] = json.loads(text)
    assert body["nodeEligible"] is True and body["healthy"] is True
    assert body["currentTime"] == go_time(clock.now)
    health.queued_update("IPv4")
    clock.now += 30
    assert get(app, "/healthz")[0] == 200  # queued but not late yet
    health.updated("IPv4")
    clock.now += 1000
    code, _, text = get(app, "/livez")
    assert code == 200
    assert "nodeEligible" not in json.loads(text)
    assert b'kubeproxy_proxy_healthz_total{code="200"} 2.0' in metrics.exposition()


def test_late_update_is_503_on_both() -> None:
    clock = Clock()
    health = ProxyHealth(health_timeout=60.0, clock=clock)
    health.updated("IPv4")
    last = clock.now
    clock.now += 5
    health.queued_update("IPv4")
    clock.now += 61
    app = health_app(health)
    code, _, text = get(app, "/healthz")
    body = json.loads(text)
    assert code == 503 and body["healthy"] is False
    assert body["lastUpdated"] == go_time(last)
    assert body["status"]["IPv4"]["healthy"] is False
    assert get(app, "/livez")[0] == 503


def test_node_being_deleted_fails_healthz_not_livez() -> None:
    health = ProxyHealth(health_timeout=60.0, clock=Clock())
    health.sync_node({"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "other"}]}})
    assert health.node_eligible
    health.sync_node(
        {
            "metadata": {"name": "n1"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]},
        }
    )
    app = health_app(health)
    code, _, text = get(app, "/healthz")
    assert code == 503 and json.loads(text)["nodeEligible"] is False
    assert get(app, "/livez")[0] == 200
    health.sync_node({"metadata": {"name": "n1", "deletionTimestamp": "2024-01-01T00:00:00Z"}})
    assert not health.node_eligible


def test_metrics_server_serves_upstream_names() -> None:
    metrics = ProxyMetrics()
    metrics.sync_full_duration.labels(ip_family="IPv4").observe(0.2)
    metrics.restore_failures.labels(ip_family="IPv4").inc()
    metrics.iptables_total.labels(table="nat", ip_family="IPv4").set(42)
    app = metrics_app(metrics, "iptables", lambda: {"mode": "iptables"})
    code, headers, text = get(app, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        'kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family="IPv4",le="0.256"} 1.0',
        'kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 1.0',
        'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 42.0',
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0.0",
        "kubeproxy_sync_proxy_rules_service_changes_total 0.0",
        "# TYPE kubeproxy_network_programming_duration_seconds histogram",
    ):
        assert name in text, name
    assert "_created" not in text
    assert get(app, "/proxyMode")[2] == "iptables"
    assert get(app, "/healthz")[2] == "ok"
    assert json.loads(get(app, "/configz")[2]) == {"kubeproxy.config.k8s.io": {"mode": "iptables"}}
