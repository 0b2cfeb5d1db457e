"""Validation of the kinds a proxy consumes: Service, EndpointSlice, Endpoints.

Owns upstream's ``ValidateService``, ``ValidateEndpointSlice`` and
``ValidateEndpoints`` rules for defaulted objects, with upstream's field paths and
messages, so that no Service or slice a proxy would choke on is ever stored.
Node-port range checks are a hook (``node_port_range``): the allocator in the
apiserver owns the range.

Invariant: every function returns field errors for arbitrary JSON; none raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kproxy.api import fieldchecks as fc
from kproxy.api.errors import FieldError
from kproxy.api.meta import validate_labels

Errs = list[FieldError]

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
SESSION_AFFINITIES = ("None", "ClientIP")
TRAFFIC_POLICIES = ("Cluster", "Local")
IP_FAMILIES = ("IPv4", "IPv6")
IP_FAMILY_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")
MAX_AFFINITY_SECONDS = 86400


def _validate_service_ports(
    spec: Mapping[str, Any], node_port_range: tuple[int, int] | None
) -> Errs:
    errs: Errs = []
    ports = spec.get("ports")
    if ports is not None and not isinstance(ports, list):
        return [FieldError.invalid("spec.ports", ports, "must be a list")]
    ports = fc.as_list(ports)
    svc_type = spec.get("type")
    names: set[str] = set()
    keys: set[tuple[Any, Any]] = set()
    node_ports: set[tuple[Any, Any]] = set()
    for i, port in enumerate(ports):
        p = f"spec.ports[{i}]"
        if not isinstance(port, Mapping):
            errs.append(FieldError.invalid(p, port, "must be an object"))
            continue
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            errs.append(FieldError.required(f"{p}.name"))
        elif name:
            errs.extend(fc.dns_label(name, f"{p}.name"))
            if isinstance(name, str) and name in names:  # a non-string was reported above
                errs.append(FieldError.duplicate(f"{p}.name", name))
            names.add(str(name))
        errs.extend(fc.port_number(port.get("port"), f"{p}.port"))
        errs.extend(fc.protocol(port.get("protocol"), f"{p}.protocol"))
        key = (port.get("port"), port.get("protocol"))
        # An object or list here was reported above; it cannot be a set member.
        if all(isinstance(v, str | int | None) for v in key):
            if key in keys:
                errs.append(FieldError.duplicate(p, {"port": key[0], "protocol": key[1]}))
            keys.add(key)
        if svc_type != "ExternalName" or port.get("targetPort") is not None:
            errs.extend(fc.port_num_or_name(port.get("targetPort"), f"{p}.targetPort"))
        if port.get("appProtocol") is not None:
            errs.extend(fc.qualified_name(port.get("appProtocol"), f"{p}.appProtocol"))
        node_port = port.get("nodePort")
        if node_port not in (None, 0):
            if svc_type not in ("NodePort", "LoadBalancer"):
                errs.append(
                    FieldError.forbidden(
                        f"{p}.nodePort", f"may not be used when `type` is '{svc_type}'"
                    )
                )
            elif not fc.is_int(node_port) or not 1 <= node_port <= 65535:
                errs.extend(fc.port_number(node_port, f"{p}.nodePort"))
            elif node_port_range and not node_port_range[0] <= node_port <= node_port_range[1]:
                lo, hi = node_port_range
                errs.append(
                    FieldError.invalid(
                        f"{p}.nodePort",
                        node_port,
                        f"provided port is not in the valid range. The range of valid ports "
                        f"is {lo}-{hi}",
                    )
                )
            nkey = (node_port, port.get("protocol"))
            if nkey in node_ports:
                errs.append(FieldError.duplicate(f"{p}.nodePort", node_port))
            node_ports.add(nkey)
    return errs


def _validate_cluster_ips(spec: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    svc_type = spec.get("type")
    cluster_ip = spec.get("clusterIP") or ""
    cluster_ips = spec.get("clusterIPs")
    if svc_type == "ExternalName":
        if cluster_ip:
            errs.append(
                FieldError.forbidden("spec.clusterIP", "may not be set for ExternalName services")
            )
        if cluster_ips:
            errs.append(
                FieldError.forbidden("spec.clusterIPs", "may not be set for ExternalName services")
            )
        return errs
    if cluster_ips is not None and not isinstance(cluster_ips, list):
        return [FieldError.invalid("spec.clusterIPs", cluster_ips, "must be a list")]
    ips = fc.as_list(cluster_ips)
    if cluster_ip and ips and ips[0] != cluster_ip:
        errs.append(
            FieldError.invalid("spec.clusterIPs", ips, "first value must match `clusterIP`")
        )
    if len(ips) > 2:
        errs.append(FieldError.invalid("spec.clusterIPs", ips, "may only hold up to 2 values"))
    for i, value in enumerate(ips):
        p = f"spec.clusterIPs[{i}]"
        if value == "None":
            if i > 0 or len(ips) > 1:
                errs.append(FieldError.invalid(p, value, "'None' must be the first and only value"))
            if svc_type in ("NodePort", "LoadBalancer"):
                errs.append(
                    FieldError.invalid(
                        "spec.clusterIP", value, f"may not be set to 'None' for {svc_type} services"
                    )
                )
            continue
        errs.extend(fc.ip(value, p))
    families = [fc.ip_family_of(v) for v in ips if v != "None"]
    if len(families) == 2 and families[0] == families[1] and None not in families:
        errs.append(
            FieldError.invalid(
                "spec.clusterIPs", ips, "may specify no more than one IP for each IP family"
            )
        )
    if cluster_ip and not ips and cluster_ip != "None":  # no mirrored list: check it here
        errs.extend(fc.ip(cluster_ip, "spec.clusterIP"))
    return errs


def _validate_ip_families(spec: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    policy = spec.get("ipFamilyPolicy")
    families = spec.get("ipFamilies")
    if spec.get("type") == "ExternalName":
        if policy:
            errs.append(
                FieldError.forbidden(
                    "spec.ipFamilyPolicy", "may not be set for ExternalName services"
                )
            )
        if families:
            errs.append(
                FieldError.forbidden("spec.ipFamilies", "may not be set for ExternalName services")
            )
        return errs
    errs.extend(fc.enum(policy, "spec.ipFamilyPolicy", IP_FAMILY_POLICIES, required=False))
    if families is not None and not isinstance(families, list):
        return [*errs, FieldError.invalid("spec.ipFamilies", families, "must be a list")]
    fams = fc.as_list(families)
    seen: set[Any] = set()
    for i, fam in enumerate(fams):
        errs.extend(fc.enum(fam, f"spec.ipFamilies[{i}]", IP_FAMILIES))
        if fam in seen:
            errs.append(FieldError.duplicate(f"spec.ipFamilies[{i}]", fam))
        seen.add(fam)
    if len(fams) > 2:
        errs.append(FieldError.too_many("spec.ipFamilies", len(fams), 2))
    if len(fams) == 2 and policy == "SingleStack":
        errs.append(
            FieldError.invalid(
                "spec.ipFamilyPolicy",
                policy,
                "must be 'PreferDualStack' or 'RequireDualStack' when multiple IP families "
                "are specified",
            )
        )
    ips = [v for v in fc.as_list(spec.get("clusterIPs")) if v != "None"]
    for i, value in enumerate(ips):
        fam = fc.ip_family_of(value)
        if fam is not None and i < len(fams) and fams[i] != fam:
            errs.append(
                FieldError.invalid(
                    f"spec.clusterIPs[{i}]",
                    value,
                    f"expected an {fams[i]} value as indicated by `ipFamilies[{i}]`",
                )
            )
    return errs


def validate_service(
    svc: Mapping[str, Any], node_port_range: tuple[int, int] | None = None
) -> Errs:
    """``ValidateService`` on a defaulted Service (metadata is checked by the caller)."""
    spec = svc.get("spec")
    if not isinstance(spec, Mapping):
        return [FieldError.required("spec")]
    errs: Errs = []
    svc_type = spec.get("type")
    errs.extend(fc.enum(svc_type, "spec.type", SERVICE_TYPES))
    headless = spec.get("clusterIP") == "None"
    if not spec.get("ports") and svc_type != "ExternalName" and not headless:
        errs.append(FieldError.required("spec.ports"))
    errs.extend(_validate_service_ports(spec, node_port_range))
    errs.extend(_validate_cluster_ips(spec))
    errs.extend(_validate_ip_families(spec))
    if svc_type == "ExternalName":
        external = spec.get("externalName")
        if not external:
            errs.append(FieldError.required("spec.externalName"))
        elif isinstance(external, str):
            errs.extend(fc.dns_subdomain(external.rstrip("."), "spec.externalName"))
        else:
            errs.append(FieldError.invalid("spec.externalName", external, "must be a string"))

    affinity = spec.get("sessionAffinity")
    errs.extend(fc.enum(affinity, "spec.sessionAffinity", SESSION_AFFINITIES))
    config = spec.get("sessionAffinityConfig")
    if affinity == "ClientIP":
        timeout = fc.as_map(fc.as_map(config).get("clientIP")).get("timeoutSeconds")
        if not fc.is_int(timeout) or not 0 < timeout <= MAX_AFFINITY_SECONDS:
            errs.append(
                FieldError.invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    timeout,
                    f"must be greater than 0 and less than {MAX_AFFINITY_SECONDS}",
                )
            )
    elif affinity == "None" and config:
        errs.append(
            FieldError.forbidden(
                "spec.sessionAffinityConfig", "must not be set when session affinity is None"
            )
        )

    etp = spec.get("externalTrafficPolicy")
    if svc_type in ("NodePort", "LoadBalancer"):
        errs.extend(fc.enum(etp, "spec.externalTrafficPolicy", TRAFFIC_POLICIES))
    elif etp:
        errs.append(
            FieldError.invalid(
                "spec.externalTrafficPolicy",
                etp,
                "may only be set when `type` is 'NodePort' or 'LoadBalancer'",
            )
        )
    hc = spec.get("healthCheckNodePort")
    if hc not in (None, 0):
        if svc_type != "LoadBalancer" or etp != "Local":
            errs.append(
                FieldError.invalid(
                    "spec.healthCheckNodePort",
                    hc,
                    "may only be set when `type` is 'LoadBalancer' and "
                    "`externalTrafficPolicy` is 'Local'",
                )
            )
        else:
            errs.extend(fc.port_number(hc, "spec.healthCheckNodePort"))
    if svc_type != "ExternalName":
        errs.extend(
            fc.enum(
                spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", TRAFFIC_POLICIES
            )
        )

    for i, value in enumerate(fc.as_list(spec.get("externalIPs"))):
        p = f"spec.externalIPs[{i}]"
        addr = fc.parse_ip(value)
        if addr is None:
            errs.extend(fc.ip(value, p))
        elif addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast:
            errs.append(
                FieldError.invalid(
                    p, value, "may not be unspecified, loopback, link-local or multicast"
                )
            )
    ranges = spec.get("loadBalancerSourceRanges")
    if ranges:
        if svc_type != "LoadBalancer":
            errs.append(
                FieldError.forbidden(
                    "spec.loadBalancerSourceRanges",
                    "may only be used when `type` is 'LoadBalancer'",
                )
            )
        for i, value in enumerate(fc.as_list(ranges)):
            errs.extend(
                fc.cidr(
                    str(value).strip() if isinstance(value, str) else value,
                    f"spec.loadBalancerSourceRanges[{i}]",
                    "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 ",
                )
            )
    if spec.get("loadBalancerIP") and svc_type != "LoadBalancer":
        errs.append(
            FieldError.forbidden(
                "spec.loadBalancerIP", "may only be used when `type` is 'LoadBalancer'"
            )
        )
    alloc = spec.get("allocateLoadBalancerNodePorts")
    if svc_type == "LoadBalancer" and alloc is None:
        errs.append(FieldError.required("spec.allocateLoadBalancerNodePorts"))
    elif svc_type != "LoadBalancer" and alloc is not None:
        errs.append(
            FieldError.forbidden(
                "spec.allocateLoadBalancerNodePorts",
                "may only be used when `type` is 'LoadBalancer'",
            )
        )
    errs.extend(validate_labels(spec.get("selector"), "spec.selector"))
    pna = spec.get("publishNotReadyAddresses")
    if pna is not None and not isinstance(pna, bool):
        errs.append(FieldError.invalid("spec.publishNotReadyAddresses", pna, "must be a boolean"))
    return errs


# -------------------------------------------------------------- EndpointSlice

ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
MAX_ENDPOINTS = 1000
MAX_SLICE_PORTS = 20000
MAX_ADDRESSES = 1
MAX_ZONE_HINTS = 8


def _validate_slice_address(value: Any, address_type: Any, path: str) -> Errs:
    if address_type == "FQDN":
        return fc.dns_subdomain(value, path)
    family = fc.ip_family_of(value)
    if address_type in ("IPv4", "IPv6") and family != address_type:
        return [FieldError.invalid(path, value, f"must be a valid {address_type} address")]
    return []


def validate_endpoint_slice(eps: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    address_type = eps.get("addressType")
    errs.extend(fc.enum(address_type, "addressType", ADDRESS_TYPES))
    endpoints = eps.get("endpoints")
    if endpoints is not None and not isinstance(endpoints, list):
        errs.append(FieldError.invalid("endpoints", endpoints, "must be a list"))
    endpoints = fc.as_list(endpoints)
    if len(endpoints) > MAX_ENDPOINTS:
        errs.append(FieldError.too_many("endpoints", len(endpoints), MAX_ENDPOINTS))
    for i, ep in enumerate(endpoints):
        p = f"endpoints[{i}]"
        if not isinstance(ep, Mapping):
            errs.append(FieldError.invalid(p, ep, "must be an object"))
            continue
        addresses = fc.as_list(ep.get("addresses"))
        if not addresses:
            errs.append(FieldError.required(f"{p}.addresses", "must contain at least 1 address"))
        elif len(addresses) > MAX_ADDRESSES:
            errs.append(FieldError.too_many(f"{p}.addresses", len(addresses), MAX_ADDRESSES))
        for j, addr in enumerate(addresses):
            errs.extend(_validate_slice_address(addr, address_type, f"{p}.addresses[{j}]"))
        conditions = ep.get("conditions")
        if conditions is not None:
            for key, value in fc.as_map(conditions).items():
                if value is not None and not isinstance(value, bool):
                    errs.append(
                        FieldError.invalid(f"{p}.conditions.{key}", value, "must be a boolean")
                    )
        if ep.get("hostname") is not None:
            errs.extend(fc.dns_label(ep.get("hostname"), f"{p}.hostname"))
        if ep.get("nodeName") is not None:
            errs.extend(fc.dns_subdomain(ep.get("nodeName"), f"{p}.nodeName"))
        zones = fc.as_list(fc.as_map(ep.get("hints")).get("forZones"))
        if len(zones) > MAX_ZONE_HINTS:
            errs.append(FieldError.too_many(f"{p}.hints.forZones", len(zones), MAX_ZONE_HINTS))
    ports = fc.as_list(eps.get("ports"))
    if len(ports) > MAX_SLICE_PORTS:
        errs.append(FieldError.too_many("ports", len(ports), MAX_SLICE_PORTS))
    names: set[Any] = set()
    for i, port in enumerate(ports):
        p = f"ports[{i}]"
        if not isinstance(port, Mapping):
            errs.append(FieldError.invalid(p, port, "must be an object"))
            continue
        name = port.get("name") or ""
        if name:
            errs.extend(fc.dns_label(name, f"{p}.name"))
        if name in names:
            errs.append(FieldError.duplicate(f"{p}.name", name))
        names.add(name)
        errs.extend(fc.protocol(port.get("protocol"), f"{p}.protocol"))
        if port.get("port") is not None:
            errs.extend(fc.port_number(port.get("port"), f"{p}.port"))
        if port.get("appProtocol") is not None:
            errs.extend(fc.qualified_name(port.get("appProtocol"), f"{p}.appProtocol"))
    return errs


# ------------------------------------------------------------------ Endpoints


def _validate_endpoint_address(addr: Any, path: str) -> Errs:
    if not isinstance(addr, Mapping):
        return [FieldError.invalid(path, addr, "must be an object")]
    errs = (
        fc.ip(addr.get("ip"), f"{path}.ip")
        if addr.get("ip")
        else [FieldError.required(f"{path}.ip")]
    )
    if addr.get("hostname"):
        errs.extend(fc.dns_label(addr.get("hostname"), f"{path}.hostname"))
    if addr.get("nodeName"):
        errs.extend(fc.dns_subdomain(addr.get("nodeName"), f"{path}.nodeName"))
    return errs


def validate_endpoints(ep: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    for i, subset in enumerate(fc.as_list(ep.get("subsets"))):
        p = f"subsets[{i}]"
        subset = fc.as_map(subset)
        addresses = fc.as_list(subset.get("addresses"))
        not_ready = fc.as_list(subset.get("notReadyAddresses"))
        if not addresses and not not_ready:
            errs.append(FieldError.required(p, "must specify `addresses` or `notReadyAddresses`"))
        for j, addr in enumerate(addresses):
            errs.extend(_validate_endpoint_address(addr, f"{p}.addresses[{j}]"))
        for j, addr in enumerate(not_ready):
            errs.extend(_validate_endpoint_address(addr, f"{p}.notReadyAddresses[{j}]"))
        ports = fc.as_list(subset.get("ports"))
        names: set[Any] = set()
        for j, port in enumerate(ports):
            pp = f"{p}.ports[{j}]"
            port = fc.as_map(port)
            name = port.get("name") or ""
            if len(ports) > 1 and not name:
                errs.append(FieldError.required(f"{pp}.name"))
            elif name:
                errs.extend(fc.dns_label(name, f"{pp}.name"))
                if name in names:
                    errs.append(FieldError.duplicate(f"{pp}.name", name))
                names.add(name)
            errs.extend(fc.port_number(port.get("port"), f"{pp}.port"))
            errs.extend(fc.protocol(port.get("protocol"), f"{pp}.protocol"))
    return errs
