"""Pure-Python twin of the selection part of :mod:`kproxy._fastpath` (``_fastpath_select.pxi``).

Re-exported by :mod:`kproxy._fastpath_py`. Owns:

- ``hash64``: the one seeded 64-bit hash both builds use (FNV-1a 64 over the
  bytes, offset basis XOR seed, then MurmurHash3's ``fmix64`` finaliser so that
  short keys still spread over the high bits). It is fixed forever: every node
  and both builds must derive the same Maglev table from the same backends;
- ``flow_hash`` of a 5-tuple (serialised as ``proto | sport | dport | src | dst``,
  ports big-endian, addresses packed) and ``client_key`` (an IP as packed bytes);
- ``Maglev``: Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4) with
  weights as Katran's ``MaglevHashV2`` (a backend claims a slot in a round only
  when its accumulated weight reaches the largest weight);
- ``ClientIPAffinity``: ClientIP session affinity records with a TTL.

Invariants: ``Maglev.table()`` is a pure function of (backends, weights,
table_size); a record of ``ClientIPAffinity`` is live while
``now - last_used < timeout`` and ``get`` refreshes it, as upstream's userspace
balancer did.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Final, TypeAlias

from kproxy._fastpath_parse_py import PARSE_OK, parse_packet

__all__ = [
    "FLOW_SEED",
    "MAGLEV_OFFSET_SEED",
    "MAGLEV_SKIP_SEED",
    "ClientIPAffinity",
    "Maglev",
    "client_key",
    "flow_hash",
    "hash64",
]

_MASK: Final = 0xFFFFFFFFFFFFFFFF
_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
# Arbitrary fixed seeds; changing one moves every flow on every node.
MAGLEV_OFFSET_SEED: Final = 0x6B70726F78796D31
MAGLEV_SKIP_SEED: Final = 0x6B70726F78796D32
FLOW_SEED: Final = 0x6B70726F78796633

FlowKey: TypeAlias = "bytes | tuple[int, bytes | str, int, bytes | str, int]"


def hash64(data: bytes, seed: int = 0) -> int:
    """FNV-1a 64 seeded through the offset basis, finished with MurmurHash3 ``fmix64``."""
    h = (_FNV_OFFSET ^ seed) & _MASK
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK
    h ^= h >> 33
    return h


def client_key(ip: bytes | str) -> bytes:
    """An IP as packed bytes (4 or 16); raises ValueError for anything else."""
    if isinstance(ip, bytes):
        if len(ip) not in (4, 16):
            raise ValueError(f"packed address must be 4 or 16 bytes, got {len(ip)}")
        return ip
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError as e:
        raise ValueError(f"not an IP address: {ip!r}") from e


def flow_hash(proto: int, src: bytes | str, sport: int, dst: bytes | str, dport: int) -> int:
    """Hash of a 5-tuple; addresses packed (or text), ports and proto as integers."""
    if not (0 <= proto <= 0xFF and 0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError("proto must fit 8 bits and ports 16 bits")
    data = bytes((proto, sport >> 8, sport & 0xFF, dport >> 8, dport & 0xFF))
    return hash64(data + client_key(src) + client_key(dst), FLOW_SEED)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


class Maglev:
    """A Maglev lookup table of ``table_size`` slots over ``backends``.

    ``weights`` (non-negative integers, default all 1) follow Katran's
    MaglevHashV2; a backend of weight 0 owns no slot. With no backend of
    positive weight the table is empty and lookups raise LookupError.
    ``table_size`` must be a prime (every permutation row is then complete)
    below 2**31.
    """

    __slots__ = ("_backends", "_m", "_table", "_weights")

    def __init__(
        self,
        backends: Sequence[str],
        weights: Sequence[int] | None = None,
        table_size: int = 65537,
    ) -> None:
        if not _is_prime(table_size) or table_size >= 2**31:
            raise ValueError(f"table_size must be a prime below 2**31, got {table_size}")
        names = tuple(backends)
        ws = tuple(1 for _ in names) if weights is None else tuple(int(w) for w in weights)
        if len(ws) != len(names):
            raise ValueError(f"{len(names)} backends but {len(ws)} weights")
        if any(w < 0 or w >= 2**31 for w in ws):
            raise ValueError("weights must be in [0, 2**31)")
        self._backends = names
        self._weights = ws
        self._m = table_size
        self._table = self._build(names, ws, table_size)

    @staticmethod
    def _build(names: tuple[str, ...], ws: tuple[int, ...], m: int) -> list[int]:
        live = [i for i, w in enumerate(ws) if w > 0]
        if not live:
            return []
        if len(live) == 1:
            return [live[0]] * m
        offsets: list[int] = []
        skips: list[int] = []
        for i in live:
            key = names[i].encode()
            offsets.append(hash64(key, MAGLEV_OFFSET_SEED) % m)
            skips.append(hash64(key, MAGLEV_SKIP_SEED) % (m - 1) + 1)
        max_weight = max(ws)
        table = [-1] * m
        nxt = [0] * len(live)
        cum = [0] * len(live)
        filled = 0
        # Katran's MaglevHashV2: each round, a backend claims its next free
        # preferred slot only when its accumulated weight reaches max_weight.
        while True:
            for j, i in enumerate(live):
                cum[j] += ws[i]
                if cum[j] < max_weight:
                    continue
                cum[j] -= max_weight
                off, skip = offsets[j], skips[j]
                cur = (off + nxt[j] * skip) % m
                while table[cur] >= 0:
                    nxt[j] += 1
                    cur = (off + nxt[j] * skip) % m
                table[cur] = i
                nxt[j] += 1
                filled += 1
                if filled == m:
                    return table

    @property
    def backends(self) -> tuple[str, ...]:
        return self._backends

    @property
    def weights(self) -> tuple[int, ...]:
        return self._weights

    @property
    def table_size(self) -> int:
        return self._m

    def __len__(self) -> int:
        return len(self._backends)

    def table(self) -> list[int]:
        """The slot → backend index table (empty when no backend has weight)."""
        return list(self._table)

    def lookup(self, h: int) -> int:
        """Index of the backend owning hash ``h`` (a non-negative 64-bit integer)."""
        if not self._table:
            raise LookupError("no backends")
        if not 0 <= h <= _MASK:
            # OverflowError, as the compiled build's conversion to uint64_t raises.
            raise OverflowError("hash must be a non-negative 64-bit integer")
        return self._table[h % self._m]

    def select(self, key: FlowKey) -> str:
        """The backend for ``key``: raw bytes, or a 5-tuple ``(proto, src, sport, dst, dport)``."""
        if isinstance(key, bytes):
            h = hash64(key, FLOW_SEED)
        else:
            proto, src, sport, dst, dport = key
            h = flow_hash(proto, src, sport, dst, dport)
        return self._backends[self.lookup(h)]

    def lookup_packet(self, buf: bytes | bytearray | memoryview) -> int:
        """Backend index for the packet ``buf`` (IP header first), or ``-status`` of the parse."""
        if not self._table:
            raise LookupError("no backends")
        status, _, proto, src, sport, dst, dport = parse_packet(buf)
        if status != PARSE_OK:
            return -status
        return self._table[flow_hash(proto, src, sport, dst, dport) % self._m]


class _Record:
    __slots__ = ("backend", "last_used")

    def __init__(self, backend: str, last_used: float) -> None:
        self.backend = backend
        self.last_used = last_used


class ClientIPAffinity:
    """Client IP → backend records with a TTL of ``timeout`` seconds.

    ``get`` returns the backend of a live record (and refreshes it) or None;
    ``set`` (re)writes a record; expired records stay until ``sweep`` removes
    them (or ``set`` overwrites them). ``remove_backend`` drops the records of a
    backend that went away. Client IPs are text or packed bytes.
    """

    __slots__ = ("_records", "_timeout")

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._timeout = float(timeout)
        self._records: dict[bytes, _Record] = {}

    @property
    def timeout(self) -> float:
        return self._timeout

    def __len__(self) -> int:
        return len(self._records)

    def get(self, client_ip: bytes | str, now: float) -> str | None:
        rec = self._records.get(client_key(client_ip))
        if rec is None or now - rec.last_used >= self._timeout:
            return None
        rec.last_used = float(now)
        return rec.backend

    def set(self, client_ip: bytes | str, backend: str, now: float) -> None:
        self._records[client_key(client_ip)] = _Record(backend, float(now))

    def sweep(self, now: float) -> int:
        """Drop expired records; returns how many."""
        t = self._timeout
        dead = [k for k, rec in self._records.items() if now - rec.last_used >= t]
        for k in dead:
            del self._records[k]
        return len(dead)

    def remove_backend(self, backend: str) -> int:
        """Drop every record pointing at ``backend``; returns how many."""
        dead = [k for k, rec in self._records.items() if rec.backend == backend]
        for k in dead:
            del self._records[k]
        return len(dead)

    def clear(self) -> None:
        self._records.clear()

    def records(self) -> list[tuple[bytes, str, float]]:
        """``(packed client IP, backend, last_used)`` for every record, sorted."""
        out = [(k, r.backend, r.last_used) for k, r in self._records.items()]
        out.sort()
        return out
