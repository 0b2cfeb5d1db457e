"""``kproxy render ipvs``: config + service/endpoint maps → the plan's text.

Owns only the composition of :func:`~kproxy.proxy.ipvs.options.ipvs_options`
and :func:`~kproxy.proxy.ipvs.plan.plan_ipvs` for a dry run; it touches no host
state (node addresses come from the caller: ``--node-ip`` and the Node object).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.ipvs.options import ipvs_options
from kproxy.proxy.ipvs.plan import plan_ipvs
from kproxy.proxy.types import IPV4, EndpointInfo, ServicePortInfo, ServicePortName

__all__ = ["render_ipvs"]


def render_ipvs(
    cfg: ProxyConfig,
    services: Mapping[ServicePortName, ServicePortInfo],
    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
    *,
    node_name: str,
    node_ips: tuple[str, ...] = (),
    topology_labels: tuple[tuple[str, str], ...] = (),
    family: str = IPV4,
    random_fully: bool = False,
    kernel_version: tuple[int, int] | None = None,
) -> str:
    """The text of the plan a full IPVS sync would apply (see :meth:`IpvsPlan.render`)."""
    options = ipvs_options(
        cfg,
        node_name=node_name,
        node_ips=node_ips,
        family=family,
        topology_labels=topology_labels,
        random_fully=random_fully,
        kernel_version=kernel_version,
    )
    return plan_ipvs(services, endpoints, options).render()
