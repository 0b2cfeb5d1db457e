"""Field-level checks shared by the per-kind validators.

Owns the small upstream validators each kind reuses, returning
:class:`FieldError` lists at a given path: port numbers and IANA port names, IP
addresses and CIDRs (with upstream's messages), enumerations, non-negative and
bounded integers, quantities, and the typed accessors that let validation run on
any JSON (a string where a list belongs is an error, never an exception).

Invariant: every function here is total on arbitrary JSON input.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from kproxy.api import meta
from kproxy.api.errors import FieldError
from kproxy.api.quantity import is_quantity

Errs = list[FieldError]

PROTOCOLS = ("TCP", "UDP", "SCTP")


def as_map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def required_str(value: Any, path: str) -> Errs:
    if value in (None, ""):
        return [FieldError.required(path)]
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return []


def enum(value: Any, path: str, supported: Iterable[str], *, required: bool = True) -> Errs:
    """One of ``supported``; empty is Required (or allowed when not ``required``)."""
    allowed = tuple(supported)
    if value in (None, ""):
        return [FieldError.required(path)] if required else []
    if value not in allowed:
        return [FieldError.not_supported(path, value, allowed)]
    return []


def port_number(value: Any, path: str) -> Errs:
    if not is_int(value) or not 1 <= value <= 65535:
        return [FieldError.invalid(path, value, "must be between 1 and 65535, inclusive")]
    return []


_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")
_PORT_NAME_LETTER = re.compile(r"[a-z]")


def port_name_errors(name: str) -> list[str]:
    """``IsValidPortName``: an IANA_SVC_NAME (RFC 6335)."""
    errs = []
    if len(name) > 15:
        errs.append("must be no more than 15 characters")
    if not _PORT_NAME_CHARS.fullmatch(name):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if "--" in name:
        errs.append("must not contain consecutive hyphens")
    if name and not _PORT_NAME_LETTER.search(name):
        errs.append("must contain at least one letter (a-z)")
    if name.startswith("-") or name.endswith("-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def port_name(value: Any, path: str) -> Errs:
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return [FieldError.invalid(path, value, m) for m in port_name_errors(value)]


def port_num_or_name(value: Any, path: str) -> Errs:
    """A targetPort / probe port: a number 1..65535 or an IANA port name."""
    if is_int(value):
        return port_number(value, path)
    if isinstance(value, str):
        if not value:
            return [FieldError.required(path)]
        return port_name(value, path)
    return [FieldError.invalid(path, value, "must be an integer or a port name")]


def protocol(value: Any, path: str) -> Errs:
    if value in (None, ""):
        return [FieldError.required(path)]
    if value not in PROTOCOLS:
        return [FieldError.not_supported(path, value, PROTOCOLS)]
    return []


IP_MESSAGE = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
CIDR_MESSAGE = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"


def parse_ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, str):
        return None
    try:
        # Leading zeros (010.0.0.1) are rejected, as Go's netip is strict.
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def ip(value: Any, path: str) -> Errs:
    return [] if parse_ip(value) is not None else [FieldError.invalid(path, value, IP_MESSAGE)]


def ip_family_of(value: Any) -> str | None:
    addr = parse_ip(value)
    if addr is None:
        return None
    return "IPv4" if addr.version == 4 else "IPv6"


def cidr(value: Any, path: str, message: str = CIDR_MESSAGE) -> Errs:
    if isinstance(value, str) and "/" in value:
        try:
            ipaddress.ip_network(value, strict=False)
            return []
        except ValueError:
            pass
    return [FieldError.invalid(path, value, message)]


def non_negative(value: Any, path: str) -> Errs:
    if value is None:
        return []
    if not is_int(value):
        return [FieldError.invalid(path, value, "must be an integer")]
    if value < 0:
        return [FieldError.invalid(path, value, "must be greater than or equal to 0")]
    return []


def positive(value: Any, path: str) -> Errs:
    if value is None:
        return []
    if not is_int(value):
        return [FieldError.invalid(path, value, "must be an integer")]
    if value <= 0:
        return [FieldError.invalid(path, value, "must be greater than 0")]
    return []


def quantity_map(value: Any, path: str) -> Errs:
    errs: Errs = []
    if value is None:
        return errs
    if not isinstance(value, Mapping):
        return [FieldError.invalid(path, value, "must be a map of resource name to quantity")]
    for name, q in value.items():
        for msg in meta.is_qualified_name(str(name)):
            errs.append(FieldError.invalid(path, name, msg))
        if not is_quantity(q):
            errs.append(
                FieldError.invalid(
                    f"{path}[{name}]",
                    q,
                    "must match the regex ^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$",
                )
            )
    return errs


def dns_label(value: Any, path: str) -> Errs:
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return [FieldError.invalid(path, value, m) for m in meta.is_dns1123_label(value)]


def dns_subdomain(value: Any, path: str) -> Errs:
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return [FieldError.invalid(path, value, m) for m in meta.is_dns1123_subdomain(value)]


def qualified_name(value: Any, path: str) -> Errs:
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return [FieldError.invalid(path, value, m) for m in meta.is_qualified_name(value)]


def label_value(value: Any, path: str) -> Errs:
    if not isinstance(value, str):
        return [FieldError.invalid(path, value, "must be a string")]
    return [FieldError.invalid(path, value, m) for m in meta.is_valid_label_value(value)]
