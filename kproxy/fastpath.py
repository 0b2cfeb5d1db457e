"""Picks the compiled fast path or its pure-Python twin.

``IMPLEMENTATION`` names the module in use: ``"kproxy._fastpath"`` (compiled)
or ``"kproxy._fastpath_py"`` (twin).  The twin is used when
``KPROXY_NO_EXTENSIONS=1`` is set or the extension is missing;
``KPROXY_REQUIRE_EXTENSIONS=1`` turns a missing extension into an ImportError
so that CI cannot silently test the twin twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from types import ModuleType

from kproxy import _fastpath_py


def _load() -> ModuleType:
    if os.environ.get("KPROXY_NO_EXTENSIONS") == "1":
        return _fastpath_py
    try:
        from kproxy import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        if os.environ.get("KPROXY_REQUIRE_EXTENSIONS") == "1":
            raise
        # Not asked for: say so, since the twin is several times slower.
        logging.getLogger(__name__).warning(
            "compiled fast path kproxy._fastpath is not installed; using the pure-Python twin"
        )
        return _fastpath_py
    return _fastpath  # type: ignore[no-any-return]


_impl = _load()

IMPLEMENTATION: str = _impl.__name__
COMPILED: bool = _impl is not _fastpath_py

# Typed by the twin; the compiled module has the same API
# (tests/unit/test_fastpath_parity.py holds the two to each other).
port_proto_hash: Callable[[str, str], str] = _impl.port_proto_hash
endpoint_hash: Callable[[str, str, str], str] = _impl.endpoint_hash
RoundRobin: type[_fastpath_py.RoundRobin] = _impl.RoundRobin
probability: Callable[[int], str] = _impl.probability
endpoint_chain_names: Callable[[str, str, Sequence[str]], list[str]] = _impl.endpoint_chain_names
service_to_endpoint_rules: Callable[
    [str, str, Sequence[str], Sequence[str], bool, int, bool], list[str]
] = _impl.service_to_endpoint_rules
endpoint_chain_rules: Callable[
    [str, str, Sequence[str], Sequence[str], Sequence[str], bool, bool],
    tuple[list[str], list[str]],
] = _impl.endpoint_chain_rules

# Userspace-mode fast path: selection, packet parsing, the relay loop.
hash64: Callable[..., int] = _impl.hash64
flow_hash: Callable[[int, bytes | str, int, bytes | str, int], int] = _impl.flow_hash
client_key: Callable[[bytes | str], bytes] = _impl.client_key
Maglev: type[_fastpath_py.Maglev] = _impl.Maglev
ClientIPAffinity: type[_fastpath_py.ClientIPAffinity] = _impl.ClientIPAffinity
parse_packet: Callable[
    [bytes | bytearray | memoryview], tuple[int, int, int, bytes, int, bytes, int]
] = _impl.parse_packet
parse_into: Callable[[bytes | bytearray | memoryview, bytearray | memoryview], int] = (
    _impl.parse_into
)
RelayLoop: type[_fastpath_py.RelayLoop] = _impl.RelayLoop
PARSE_OK: int = _impl.PARSE_OK
PARSE_TRUNCATED: int = _impl.PARSE_TRUNCATED
PARSE_FRAGMENT: int = _impl.PARSE_FRAGMENT
PARSE_UNSUPPORTED: int = _impl.PARSE_UNSUPPORTED
PARSE_MALFORMED: int = _impl.PARSE_MALFORMED
PARSED_SIZE: int = _impl.PARSED_SIZE
FLOW_SEED: int = _impl.FLOW_SEED
MAGLEV_OFFSET_SEED: int = _impl.MAGLEV_OFFSET_SEED
MAGLEV_SKIP_SEED: int = _impl.MAGLEV_SKIP_SEED
MAX_EXTENSION_HEADERS: int = _impl.MAX_EXTENSION_HEADERS
RELAY_COPY_BUFFER: int = _impl.RELAY_COPY_BUFFER
# NFQUEUE data path: the queue loop (C-owned recv → verdict when compiled).
NfqLoop: type[_fastpath_py.NfqLoop] = _impl.NfqLoop
NFQ_BATCH: int = _impl.NFQ_BATCH

__all__ = [
    "COMPILED",
    "FLOW_SEED",
    "IMPLEMENTATION",
    "MAGLEV_OFFSET_SEED",
    "MAGLEV_SKIP_SEED",
    "MAX_EXTENSION_HEADERS",
    "NFQ_BATCH",
    "PARSED_SIZE",
    "PARSE_FRAGMENT",
    "PARSE_MALFORMED",
    "PARSE_OK",
    "PARSE_TRUNCATED",
    "PARSE_UNSUPPORTED",
    "RELAY_COPY_BUFFER",
    "ClientIPAffinity",
    "Maglev",
    "NfqLoop",
    "RelayLoop",
    "RoundRobin",
    "client_key",
    "endpoint_chain_names",
    "endpoint_chain_rules",
    "endpoint_hash",
    "flow_hash",
    "hash64",
    "parse_into",
    "parse_packet",
    "port_proto_hash",
    "probability",
    "service_to_endpoint_rules",
]
