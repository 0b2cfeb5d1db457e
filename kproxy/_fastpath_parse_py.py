"""Pure-Python twin of the packet parser of :mod:`kproxy._fastpath` (``_fastpath_parse.pxi``).

Re-exported by :mod:`kproxy._fastpath_py`. Owns the L3/L4 header parse that a
packet-selection path (NFQUEUE, a raw socket) needs to pick a backend: family,
upper-layer protocol, addresses and TCP/UDP ports, from a packet that starts at
the IP header.

- IPv4: IHL and options; a non-first fragment (offset ≠ 0) has no ports →
  ``PARSE_FRAGMENT`` (addresses and protocol are filled in);
- IPv6: skips hop-by-hop, routing and destination-options headers and the
  fragment header (at most ``MAX_EXTENSION_HEADERS`` of them); a non-first
  fragment → ``PARSE_FRAGMENT``;
- TCP needs its whole 20-byte base header, UDP its 8 bytes; a buffer that
  ends earlier → ``PARSE_TRUNCATED``; any other protocol → ``PARSE_UNSUPPORTED``;
  a version other than 4/6 or an IHL below 5 → ``PARSE_MALFORMED``.

Invariants: never raises on any byte string; fields are filled as far as the
parse got (the rest stay 0 / empty), identically in both builds. The
preallocated-record variant :func:`parse_into` writes ``PARSED_SIZE`` bytes:
``[0]`` family (4/6/0), ``[1]`` protocol, ``[2:4]`` source port and ``[4:6]``
destination port (big-endian), ``[6]`` address length (4/16/0), ``[7]`` 0,
``[8:24]`` source and ``[24:40]`` destination address (zero-padded).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_EXTENSION_HEADERS",
    "PARSED_SIZE",
    "PARSE_FRAGMENT",
    "PARSE_MALFORMED",
    "PARSE_OK",
    "PARSE_TRUNCATED",
    "PARSE_UNSUPPORTED",
    "parse_into",
    "parse_packet",
]

PARSE_OK: Final = 0
PARSE_TRUNCATED: Final = 1
PARSE_FRAGMENT: Final = 2
PARSE_UNSUPPORTED: Final = 3
PARSE_MALFORMED: Final = 4
PARSED_SIZE: Final = 40
MAX_EXTENSION_HEADERS: Final = 8

_SKIPPED: Final = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_FRAGMENT_HEADER: Final = 44
_L4_NEED: Final = {6: 20, 17: 8}

Parsed = tuple[int, int, int, bytes, int, bytes, int]


def parse_packet(buf: bytes | bytearray | memoryview) -> Parsed:
    """``(status, family, proto, src, sport, dst, dport)``; addresses as packed bytes."""
    b = bytes(buf)
    n = len(b)
    if n < 1:
        return (PARSE_TRUNCATED, 0, 0, b"", 0, b"", 0)
    version = b[0] >> 4
    if version == 4:
        if n < 20:
            return (PARSE_TRUNCATED, 4, 0, b"", 0, b"", 0)
        ihl = (b[0] & 0x0F) * 4
        if ihl < 20:
            return (PARSE_MALFORMED, 4, 0, b"", 0, b"", 0)
        if n < ihl:
            return (PARSE_TRUNCATED, 4, 0, b"", 0, b"", 0)
        proto = b[9]
        src, dst = b[12:16], b[16:20]
        if ((b[6] << 8) | b[7]) & 0x1FFF:
            return (PARSE_FRAGMENT, 4, proto, src, 0, dst, 0)
        return _ports(b, ihl, 4, proto, src, dst)
    if version == 6:
        if n < 40:
            return (PARSE_TRUNCATED, 6, 0, b"", 0, b"", 0)
        src, dst = b[8:24], b[24:40]
        nh = b[6]
        off = 40
        for _ in range(MAX_EXTENSION_HEADERS):
            if nh in _SKIPPED:
                if n < off + 2:
                    return (PARSE_TRUNCATED, 6, nh, src, 0, dst, 0)
                nh, off = b[off], off + (b[off + 1] + 1) * 8
            elif nh == _FRAGMENT_HEADER:
                if n < off + 8:
                    return (PARSE_TRUNCATED, 6, nh, src, 0, dst, 0)
                nh, frag_off = b[off], ((b[off + 2] << 8) | b[off + 3]) >> 3
                off += 8
                if frag_off:
                    return (PARSE_FRAGMENT, 6, nh, src, 0, dst, 0)
            else:
                break
        else:
            if nh in _SKIPPED or nh == _FRAGMENT_HEADER:
                # More extension headers than we walk: treat like an unknown protocol.
                return (PARSE_UNSUPPORTED, 6, nh, src, 0, dst, 0)
        return _ports(b, off, 6, nh, src, dst)
    return (PARSE_MALFORMED, 0, 0, b"", 0, b"", 0)


def _ports(b: bytes, off: int, family: int, proto: int, src: bytes, dst: bytes) -> Parsed:
    need = _L4_NEED.get(proto)
    if need is None:
        return (PARSE_UNSUPPORTED, family, proto, src, 0, dst, 0)
    if len(b) < off + need:
        return (PARSE_TRUNCATED, family, proto, src, 0, dst, 0)
    sport = (b[off] << 8) | b[off + 1]
    dport = (b[off + 2] << 8) | b[off + 3]
    return (PARSE_OK, family, proto, src, sport, dst, dport)


def parse_into(buf: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int:
    """Parse ``buf`` into the ``PARSED_SIZE``-byte record ``out``; returns the status.

    Raises ValueError only when ``out`` is too small (a caller bug, not a packet's).
    """
    if len(out) < PARSED_SIZE:
        raise ValueError(f"out must hold {PARSED_SIZE} bytes, got {len(out)}")
    status, family, proto, src, sport, dst, dport = parse_packet(buf)
    rec = bytearray(PARSED_SIZE)
    rec[0], rec[1] = family, proto
    rec[2:6] = bytes((sport >> 8, sport & 0xFF, dport >> 8, dport & 0xFF))
    rec[6] = len(src)
    rec[8 : 8 + len(src)] = src
    rec[24 : 24 + len(dst)] = dst
    out[:PARSED_SIZE] = rec
    return status
