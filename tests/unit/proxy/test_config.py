"""Flags and KubeProxyConfiguration YAML, with upstream names and defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kproxy.proxy.config import ConfigError, ProxyConfig, add_flags, from_args, parse_duration


def parse(argv: list[str]) -> ProxyConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("30s", 30.0),
        ("1m0s", 60.0),
        ("1m30s", 90.0),
        ("300ms", 0.3),
        ("1h", 3600.0),
        ("0", 0.0),
        ("15m", 900.0),
        ("1.5s", 1.5),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1", "s", "1x", "1s2", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_upstream_defaults() -> None:
    cfg = parse([])
    assert cfg.mode == "iptables"
    assert cfg.sync_period == 30.0 and cfg.min_sync_period == 1.0
    assert cfg.masquerade_bit == 14 and cfg.localhost_nodeports is True
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"


def test_flags() -> None:
    cfg = parse(
        [
            "--proxy-mode",
            "ipvs",
            "--cluster-cidr",
            "10.0.0.0/8,fd00::/48",
            "--masquerade-all",
            "--iptables-min-sync-period",
            "0",
            "--iptables-sync-period",
            "1m",
            "--nodeport-addresses",
            "192.168.0.0/24",
            "--iptables-localhost-nodeports=false",
            "--ipvs-scheduler",
            "wrr",
        ]
    )
    assert cfg.mode == "ipvs"
    assert cfg.cluster_cidrs == ("10.0.0.0/8", "fd00::/48")
    assert cfg.masquerade_all is True
    assert cfg.min_sync_period == 0.0 and cfg.sync_period == 60.0
    assert cfg.nodeport_addresses == ("192.168.0.0/24",)
    assert cfg.localhost_nodeports is False
    assert cfg.ipvs_scheduler == "wrr"


def test_config_file_then_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "mode: ipvs\n"
        "clusterCIDR: 10.244.0.0/16\n"
        "iptables:\n  masqueradeBit: 13\n  minSyncPeriod: 2s\n  syncPeriod: 1m0s\n"
        "ipvs:\n  scheduler: lc\n  strictARP: true\n"
        "nodePortAddresses: [primary]\n"
    )
    cfg = parse(["--config", str(path), "--proxy-mode", "iptables"])
    assert cfg.mode == "iptables"  # the explicit flag wins
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.masquerade_bit == 13 and cfg.min_sync_period == 2.0 and cfg.sync_period == 60.0
    assert cfg.ipvs_scheduler == "lc" and cfg.ipvs_strict_arp is True
    assert cfg.nodeport_addresses == ("primary",)
    assert cfg.as_configuration()["iptables"]["masqueradeBit"] == 13


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--proxy-mode", "nope"], "unknown proxy mode"),
        (["--iptables-masquerade-bit", "32"], "masquerade-bit"),
        (["--cluster-cidr", "10.0.0.0/33"], "invalid CIDR"),
        (["--iptables-sync-period", "soon"], "invalid duration"),
    ],
)
def test_bad_flags_are_clear_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_wrong_kind_rejected(tmp_path: Path) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(ConfigError, match="KubeProxyConfiguration"):
        parse(["--config", str(path)])
