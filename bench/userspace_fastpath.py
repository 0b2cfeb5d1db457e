"""Userspace fast path: compiled ``kproxy._fastpath`` vs its pure twin, in one run.

Reports, for each build on the same machine in the same process:

- selection: Maglev table build time for N = 10/100/1000 backends at M = 65537,
  the disruption when one backend is removed (share of the surviving backends'
  slots that moved), ``Maglev.select`` on a 5-tuple, ``Maglev.lookup`` of a
  ready hash, ``Maglev.lookup_packet`` (parse + hash + lookup in one call), and
  ClientIP affinity ``get`` (hit) and ``set``;
- parsing: ``parse_packet`` and ``parse_into`` on IPv4/TCP and on IPv6 with a
  hop-by-hop and a fragment header before UDP;
- relay: single-stream throughput client → relay → sink on 127.0.0.1 for the
  compiled and twin loops, splice and copy, and a direct connection, each
  bounded by ``--relay-mib`` and ``--relay-seconds``.

Ratios (compiled / twin) are what to read; absolute numbers vary run to run.
Nothing is asserted. Output: a table on stdout and ``userspace_fastpath.json``
in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kproxy import _fastpath_py

MiB = 1024 * 1024
NAMES = [f"10.1.{i // 250}.{i % 250}:8080" for i in range(1000)]

# 20-byte IPv4 header + 20-byte TCP header, 10.0.0.1:40000 → 10.96.0.10:443.
PKT4 = bytes.fromhex("450000280001000040060000" + "0a000001" + "0a60000a") + bytes.fromhex(
    "9c4001bb00000000000000005002200000000000"
)
# IPv6 fd00::1 → fd00::2, hop-by-hop (8) + fragment header (offset 0) + UDP 5353 → 53.
PKT6 = (
    bytes.fromhex("6000000000180040")
    + bytes.fromhex("fd00" + "00" * 13 + "01")
    + bytes.fromhex("fd00" + "00" * 13 + "02")
    + bytes.fromhex("2c00000000000000")  # hop-by-hop, next = fragment
    + bytes.fromhex("1100000100000001")  # fragment, next = UDP, offset 0, M=1
    + bytes.fromhex("14e9003500080000")
)


def compiled_module() -> ModuleType | None:
    try:
        return importlib.import_module("kproxy._fastpath")
    except ImportError:
        return None


def _per_op(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best seconds per call over ``repeats`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def disruption(impl: ModuleType, n: int, m: int = 65537) -> float:
    """Share of the surviving backends' slots that move when backend n//2 goes."""
    before = impl.Maglev(NAMES[:n], table_size=m).table()
    gone = n // 2
    after = impl.Maglev(NAMES[:gone] + NAMES[gone + 1 : n], table_size=m).table()
    kept = [(b, a) for b, a in zip(before, after, strict=True) if b != gone]
    return sum(1 for b, a in kept if (b if b < gone else b - 1) != a) / len(kept)


def selection(impl: ModuleType, quick: bool) -> dict[str, float]:
    n_ops = 2_000 if quick else 100_000
    out: dict[str, float] = {}
    for n in (10, 100, 1000):
        out[f"maglev_build_{n}_s"] = _best(partial(impl.Maglev, NAMES[:n]), 1 if quick else 3)
    m = impl.Maglev(NAMES[:100])
    key = (6, b"\n\x00\x00\x01", 40000, b"\n`\x00\n", 443)
    h = impl.flow_hash(*key)
    out["maglev_select_s"] = _per_op(lambda: m.select(key), n_ops)
    out["maglev_lookup_s"] = _per_op(lambda: m.lookup(h), n_ops)
    out["maglev_lookup_packet_s"] = _per_op(lambda: m.lookup_packet(PKT4), n_ops)
    aff = impl.ClientIPAffinity(10800)
    for i in range(1000):
        aff.set(f"10.2.{i // 256}.{i % 256}", NAMES[i % 100], 0.0)
    ip = b"\n\x02\x01\x05"
    out["affinity_get_s"] = _per_op(lambda: aff.get(ip, 1.0), n_ops)
    out["affinity_set_s"] = _per_op(lambda: aff.set(ip, "10.1.0.7:8080", 1.0), n_ops)

    def pick() -> object:
        # What a NEW flow costs with affinity on: a miss, then Maglev, then a record.
        b = aff.get(b"\n\x03\x00\x01", 1.0)
        if b is None:
            b = m.select(key)
        return b

    out["affinity_miss_then_maglev_s"] = _per_op(pick, n_ops)
    return out


def parsing(impl: ModuleType, quick: bool) -> dict[str, float]:
    n_ops = 2_000 if quick else 100_000
    rec = bytearray(impl.PARSED_SIZE)
    return {
        "parse_packet_v4_s": _per_op(lambda: impl.parse_packet(PKT4), n_ops),
        "parse_packet_v6ext_s": _per_op(lambda: impl.parse_packet(PKT6), n_ops),
        "parse_into_v4_s": _per_op(lambda: impl.parse_into(PKT4, rec), n_ops),
    }


def _stream(lst: socket.socket, target: tuple[str, int], total: int, seconds: float) -> float:
    """Bytes/s of one stream sent to ``target`` and read from ``lst``'s next accept."""
    client = socket.create_connection(target)
    sink, _ = lst.accept()
    received = [0]

    def drain() -> None:
        buf = bytearray(MiB)
        while True:
            n = sink.recv_into(buf)
            if not n:
                return
            received[0] += n

    reader = threading.Thread(target=drain)
    reader.start()
    block = memoryview(os.urandom(MiB))
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while sent < total and time.perf_counter() < deadline:
        client.sendall(block)
        sent += MiB
    client.shutdown(socket.SHUT_WR)
    reader.join(30)
    elapsed = time.perf_counter() - t0
    client.close()
    sink.close()
    return received[0] / elapsed


def relay_throughput(
    impl: ModuleType | None, force_copy: bool, total: int, seconds: float
) -> float:
    """Gbit/s through the relay loop of ``impl`` (None: a direct connection)."""
    sink_lst = socket.create_server(("127.0.0.1", 0))
    if impl is None:
        try:
            return _stream(sink_lst, sink_lst.getsockname(), total, seconds) * 8 / 1e9
        finally:
            sink_lst.close()
    front = socket.create_server(("127.0.0.1", 0))
    loop = impl.RelayLoop(lambda *_: None, force_copy=force_copy)
    stop = threading.Event()

    def proxy() -> None:
        front.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = front.accept()
            except TimeoutError:
                continue
            backend = socket.create_connection(sink_lst.getsockname())
            loop.add(conn.detach(), backend.detach(), 1)

    acceptor = threading.Thread(target=proxy)
    acceptor.start()
    try:
        return _stream(sink_lst, front.getsockname(), total, seconds) * 8 / 1e9
    finally:
        stop.set()
        acceptor.join()
        loop.close()
        front.close()
        sink_lst.close()


def run(quick: bool = False, relay_mib: int = 1024, relay_seconds: float = 4.0) -> dict[str, Any]:
    compiled = compiled_module()
    impls: dict[str, ModuleType] = {"twin": _fastpath_py}
    if compiled is not None:
        impls["compiled"] = compiled
    result: dict[str, Any] = {"compiled_available": compiled is not None, "builds": {}}
    for name, impl in impls.items():
        result["builds"][name] = {**selection(impl, quick), **parsing(impl, quick)}
    result["disruption"] = {
        str(n): disruption(impls["compiled" if compiled else "twin"], n) for n in (10, 100, 1000)
    }
    total = relay_mib * MiB
    relay: dict[str, float] = {"direct": relay_throughput(None, False, total, relay_seconds)}
    for name, impl in impls.items():
        for mode, copy in (("splice", False), ("copy", True)):
            relay[f"{name}_{mode}"] = relay_throughput(impl, copy, total, relay_seconds)
    result["relay_gbit_s"] = relay
    if compiled is not None:
        twin, comp = result["builds"]["twin"], result["builds"]["compiled"]
        result["speedup"] = {k: twin[k] / comp[k] for k in twin if comp[k] > 0}
    return result


def table(result: dict[str, Any]) -> str:
    builds = result["builds"]
    names = list(builds)
    lines = [f"{'metric':32}" + "".join(f"{n:>14}" for n in names) + f"{'speed-up':>10}"]
    for key in builds["twin"]:
        row = f"{key:32}"
        for n in names:
            v = builds[n][key]
            row += (
                f"{v * 1e3:>11.3f} ms" if key.startswith("maglev_build") else f"{v * 1e9:>11.0f} ns"
            )
        sp = result.get("speedup", {}).get(key)
        row += f"{sp:>9.1f}x" if sp else f"{'-':>10}"
        lines.append(row)
    lines.append("")
    lines.append(
        "Maglev disruption on removing one backend (M=65537): "
        + ", ".join(f"N={n}: {v * 100:.2f} %" for n, v in result["disruption"].items())
    )
    lines.append(
        "relay throughput, one stream on 127.0.0.1: "
        + ", ".join(f"{k} {v:.2f} Gbit/s" for k, v in result["relay_gbit_s"].items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    ap.add_argument("--relay-mib", type=int, default=1024, help="bytes per relay stream")
    ap.add_argument("--relay-seconds", type=float, default=4.0, help="time bound per stream")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    result = run(args.quick, args.relay_mib, args.relay_seconds)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "userspace_fastpath.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
