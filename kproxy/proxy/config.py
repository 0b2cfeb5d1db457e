"""The proxy's configuration: upstream flag names and KubeProxyConfiguration YAML.

Owns :class:`ProxyConfig`, the one typed view of every option the proxy
honours, built from defaults, then ``--config`` (a
``kubeproxy.config.k8s.io/v1alpha1`` KubeProxyConfiguration), then the flags
given explicitly on the command line, which win as in current upstream.
Durations use Go's syntax (``1s``, ``1m30s``, ``300ms``).

kproxy-specific KubeProxyConfiguration keys (upstream's v1alpha1 has no such
section; its userspace keys were the top-level ``udpIdleTimeout`` and
``portRange``, which are honoured too)::

    userspace:
      relay: auto          # --userspace-relay: auto (splice if compiled), splice, asyncio
      loadBalancer: rr     # --userspace-lb: rr (upstream's round robin) or maglev
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import KProxyError

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
MODES = ("iptables", "ipvs", "userspace")
DATAPATHS = ("socket", "nfqueue")
USERSPACE_RELAYS = ("auto", "splice", "asyncio")
USERSPACE_LBS = ("rr", "maglev")


class ConfigError(KProxyError):
    """A flag or configuration file that cannot be used."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a Go duration string (``"1m30s"``); bare numbers are seconds."""
    if isinstance(text, int | float):
        return float(text)
    s = text.strip()
    if s in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ConfigError(f"invalid duration {text!r} (want e.g. 1s, 30s, 1m0s)")
    return total


@dataclass(slots=True)
class ProxyConfig:
    """Every option of the proxy, with upstream's defaults."""

    mode: str = "iptables"
    hostname_override: str = ""
    bind_address: str = "0.0.0.0"
    node_ips: tuple[str, ...] = ()
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    nodeport_addresses: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    config_sync_period: float = 900.0
    kubeconfig: str = ""
    master: str = ""
    # kproxy's own: where objects come from without an apiserver, and how to apply.
    objects: str = ""
    iptables_backend: str = "auto"
    ipvs_scheduler: str = "rr"
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    ipvs_strict_arp: bool = False
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcp_fin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    conntrack_tcp_be_liberal: bool = False
    udp_timeout: float = 0.25
    proxy_port_range: str = ""
    userspace_relay: str = "auto"
    userspace_lb: str = "rr"
    # The userspace mode's data path: socket relay (upstream's) or NFQUEUE marking.
    userspace_datapath: str = "socket"
    nfqueue_selection: str = "maglev"
    nfqueue_queues: str = "0"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown proxy mode {self.mode!r}; want one of {', '.join(MODES)}")
        if not 0 <= self.masquerade_bit <= 31:
            raise ConfigError(
                f"--iptables-masquerade-bit must be in [0, 31], got {self.masquerade_bit}"
            )
        if self.min_sync_period < 0 or self.sync_period <= 0:
            raise ConfigError("sync periods must be positive (min-sync-period may be 0)")
        for cidr in (*self.cluster_cidrs, *self.ipvs_exclude_cidrs):
            _cidr(cidr)
        for addr in self.nodeport_addresses:
            if addr != "primary":
                _cidr(addr)
        for ip in self.node_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ConfigError(f"invalid node IP {ip!r}") from exc
        if self.userspace_relay not in USERSPACE_RELAYS:
            raise ConfigError(
                f"--userspace-relay must be one of {', '.join(USERSPACE_RELAYS)},"
                f" not {self.userspace_relay!r}"
            )
        if self.userspace_lb not in USERSPACE_LBS:
            raise ConfigError(
                f"--userspace-lb must be one of {', '.join(USERSPACE_LBS)},"
                f" not {self.userspace_lb!r}"
            )
        if self.userspace_datapath not in DATAPATHS:
            raise ConfigError(
                f"--userspace-datapath must be socket or nfqueue, not {self.userspace_datapath!r}"
            )
        if self.nfqueue_selection not in ("maglev", "rr"):
            raise ConfigError(
                f"--nfqueue-selection must be maglev or rr, not {self.nfqueue_selection!r}"
            )
        self.nfqueue_queue_range()
        if self.iptables_backend not in ("auto", "legacy", "nft"):
            raise ConfigError(
                f"--iptables-backend must be auto, legacy or nft, not {self.iptables_backend!r}"
            )

    def nfqueue_queue_range(self) -> tuple[int, int]:
        """``--nfqueue-queues``: ``"0"`` → (0, 0), ``"0:1"`` → (0, 1)."""
        first, sep, last = self.nfqueue_queues.strip().partition(":")
        try:
            a = int(first)
            b = int(last) if sep else a
        except ValueError:
            a = b = -1
        if not 0 <= a <= b <= 65535:
            raise ConfigError(
                f"--nfqueue-queues must be N or FIRST:LAST (0-65535), not {self.nfqueue_queues!r}"
            )
        return a, b

    def node_name(self) -> str:
        """``--hostname-override``, else the hostname, lower-cased as upstream."""
        return (self.hostname_override or socket.gethostname()).strip().lower()

    def as_configuration(self) -> dict[str, Any]:
        """This config as a KubeProxyConfiguration document (for ``/configz``)."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "mode": self.mode,
            "hostnameOverride": self.hostname_override,
            "bindAddress": self.bind_address,
            "clusterCIDR": ",".join(self.cluster_cidrs),
            "healthzBindAddress": self.healthz_bind_address,
            "metricsBindAddress": self.metrics_bind_address,
            "nodePortAddresses": list(self.nodeport_addresses),
            "configSyncPeriod": f"{self.config_sync_period:g}s",
            "iptables": {
                "masqueradeAll": self.masquerade_all,
                "masqueradeBit": self.masquerade_bit,
                "localhostNodePorts": self.localhost_nodeports,
                "syncPeriod": f"{self.sync_period:g}s",
                "minSyncPeriod": f"{self.min_sync_period:g}s",
            },
            "ipvs": {
                "scheduler": self.ipvs_scheduler,
                "excludeCIDRs": list(self.ipvs_exclude_cidrs),
                "strictARP": self.ipvs_strict_arp,
                "tcpTimeout": f"{self.ipvs_tcp_timeout:g}s",
                "tcpFinTimeout": f"{self.ipvs_tcp_fin_timeout:g}s",
                "udpTimeout": f"{self.ipvs_udp_timeout:g}s",
            },
            "conntrack": {"tcpBeLiberal": self.conntrack_tcp_be_liberal},
            "udpIdleTimeout": f"{self.udp_timeout:g}s",
            "portRange": self.proxy_port_range,
            "userspace": {"relay": self.userspace_relay, "loadBalancer": self.userspace_lb},
            "clientConnection": {"kubeconfig": self.kubeconfig},
        }


def _cidr(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"invalid CIDR {text!r}") from exc


def _csv(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


# KubeProxyConfiguration path -> (ProxyConfig field, converter)
_YAML_FIELDS: dict[tuple[str, ...], tuple[str, Any]] = {
    ("mode",): ("mode", str),
    ("hostnameOverride",): ("hostname_override", str),
    ("bindAddress",): ("bind_address", str),
    ("clusterCIDR",): ("cluster_cidrs", _csv),
    ("healthzBindAddress",): ("healthz_bind_address", str),
    ("metricsBindAddress",): ("metrics_bind_address", str),
    ("nodePortAddresses",): ("nodeport_addresses", _csv),
    ("configSyncPeriod",): ("config_sync_period", parse_duration),
    ("iptables", "masqueradeAll"): ("masquerade_all", bool),
    ("iptables", "masqueradeBit"): ("masquerade_bit", int),
    ("iptables", "localhostNodePorts"): ("localhost_nodeports", bool),
    ("iptables", "syncPeriod"): ("sync_period", parse_duration),
    ("iptables", "minSyncPeriod"): ("min_sync_period", parse_duration),
    ("ipvs", "scheduler"): ("ipvs_scheduler", str),
    ("ipvs", "excludeCIDRs"): ("ipvs_exclude_cidrs", _csv),
    ("ipvs", "strictARP"): ("ipvs_strict_arp", bool),
    ("ipvs", "tcpTimeout"): ("ipvs_tcp_timeout", parse_duration),
    ("ipvs", "tcpFinTimeout"): ("ipvs_tcp_fin_timeout", parse_duration),
    ("ipvs", "udpTimeout"): ("ipvs_udp_timeout", parse_duration),
    ("conntrack", "tcpBeLiberal"): ("conntrack_tcp_be_liberal", bool),
    ("clientConnection", "kubeconfig"): ("kubeconfig", str),
    ("udpIdleTimeout",): ("udp_timeout", parse_duration),
    ("portRange",): ("proxy_port_range", str),
    ("userspace", "relay"): ("userspace_relay", str),
    ("userspace", "loadBalancer"): ("userspace_lb", str),
}


def apply_configuration(cfg: ProxyConfig, doc: Mapping[str, Any]) -> None:
    """Apply a KubeProxyConfiguration document to ``cfg``."""
    if doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        raise ConfigError(
            f"--config must be a {KIND} of {API_VERSION}, got "
            f"{doc.get('kind')!r} of {doc.get('apiVersion')!r}"
        )
    for path, (name, conv) in _YAML_FIELDS.items():
        node: Any = doc
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            if node is None:
                continue
            try:
                setattr(cfg, name, conv(node))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{'.'.join(path)}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path} is not a YAML mapping")
    return doc


# Flag name -> (ProxyConfig field, converter, help).  argparse defaults are
# None so that only flags given explicitly override --config.
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--proxy-mode": ("mode", str, "iptables (default), ipvs or userspace"),
    "--hostname-override": ("hostname_override", str, "the node's name (default: hostname)"),
    "--bind-address": ("bind_address", str, "the node's primary IP"),
    "--node-ip": ("node_ips", _csv, "the node's IPs (kproxy; default: from the Node or host)"),
    "--cluster-cidr": ("cluster_cidrs", _csv, "pod CIDR(s), for masquerade decisions"),
    "--masquerade-all": ("masquerade_all", None, "SNAT all traffic sent via Service cluster IPs"),
    "--iptables-masquerade-bit": ("masquerade_bit", int, "fwmark bit for SNAT (0-31, default 14)"),
    "--iptables-localhost-nodeports": (
        "localhost_nodeports",
        "bool",
        "allow NodePorts on 127.0.0.1 (default true)",
    ),
    "--iptables-sync-period": ("sync_period", parse_duration, "resync/retry period (default 30s)"),
    "--iptables-min-sync-period": (
        "min_sync_period",
        parse_duration,
        "minimum interval between syncs (default 1s)",
    ),
    "--nodeport-addresses": ("nodeport_addresses", _csv, "CIDRs NodePorts answer on, or primary"),
    "--healthz-bind-address": ("healthz_bind_address", str, "default 0.0.0.0:10256; empty: off"),
    "--metrics-bind-address": ("metrics_bind_address", str, "default 127.0.0.1:10249; empty: off"),
    "--config-sync-period": ("config_sync_period", parse_duration, "informer resync (default 15m)"),
    "--kubeconfig": ("kubeconfig", str, "kubeconfig of the apiserver to follow"),
    "--master": ("master", str, "apiserver URL (overrides the kubeconfig's server)"),
    "--objects": ("objects", str, "YAML/JSON file of Services, EndpointSlices, Nodes to follow"),
    "--iptables-backend": ("iptables_backend", str, "auto (default), legacy or nft"),
    "--ipvs-scheduler": ("ipvs_scheduler", str, "rr (default), wrr, lc, wlc, sh, dh, mh"),
    "--ipvs-exclude-cidrs": (
        "ipvs_exclude_cidrs",
        _csv,
        "CIDRs whose virtual servers kproxy leaves alone",
    ),
    "--ipvs-strict-arp": ("ipvs_strict_arp", None, "set arp_ignore=1, arp_announce=2"),
    "--ipvs-tcp-timeout": ("ipvs_tcp_timeout", parse_duration, "IPVS TCP idle timeout"),
    "--ipvs-tcpfin-timeout": ("ipvs_tcp_fin_timeout", parse_duration, "IPVS TCP FIN timeout"),
    "--ipvs-udp-timeout": ("ipvs_udp_timeout", parse_duration, "IPVS UDP timeout"),
    "--conntrack-tcp-be-liberal": ("conntrack_tcp_be_liberal", None, "nf_conntrack_tcp_be_liberal"),
    "--udp-timeout": ("udp_timeout", parse_duration, "userspace UDP idle timeout (default 250ms)"),
    "--proxy-port-range": ("proxy_port_range", str, "userspace proxy port range, e.g. 30000-31000"),
    "--userspace-relay": (
        "userspace_relay",
        str,
        "kproxy: userspace TCP relay, auto (splice if compiled, default), splice or asyncio",
    ),
    "--userspace-lb": (
        "userspace_lb",
        str,
        "kproxy: userspace load balancer, rr (default, as upstream) or maglev",
    ),
    "--userspace-datapath": (
        "userspace_datapath",
        str,
        "kproxy: userspace data path, socket (relay, default) or nfqueue (first-packet marks)",
    ),
    "--nfqueue-selection": ("nfqueue_selection", str, "kproxy: nfqueue choice, maglev or rr"),
    "--nfqueue-queues": ("nfqueue_queues", str, "kproxy: NFQUEUE N or FIRST:LAST (default 0)"),
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"want true or false, got {text!r}")


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add the proxy's flags (all, or ``names``) to ``parser``."""
    parser.add_argument("--config", help="a KubeProxyConfiguration YAML file")
    for flag, (dest, conv, help_text) in FLAGS.items():
        if names is not None and flag not in names:
            continue
        if conv is None:
            parser.add_argument(flag, dest=dest, action="store_const", const=True, help=help_text)
        elif conv == "bool":
            parser.add_argument(flag, dest=dest, type=_bool, nargs="?", const=True, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=str, help=help_text)


def from_args(args: argparse.Namespace) -> ProxyConfig:
    """Defaults, then ``--config``, then explicit flags; validated."""
    cfg = ProxyConfig()
    if getattr(args, "config", None):
        apply_configuration(cfg, load_config_file(args.config))
    for flag, (dest, conv, _) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if conv is None or conv == "bool":
            setattr(cfg, dest, bool(value))
            continue
        try:
            setattr(cfg, dest, conv(value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag}: {exc}") from exc
    cfg.validate()
    return cfg


def replace(cfg: ProxyConfig, **changes: Any) -> ProxyConfig:
    return dataclasses.replace(cfg, **changes)
