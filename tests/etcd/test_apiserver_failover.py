"""An apiserver on a 3-member etcd cluster keeps every acknowledged write across the
loss of the etcd leader.

Three etcd members on loopback ports; one ``kproxy apiserver --storage-backend etcd3``
subprocess given all three endpoints (plain HTTP on 127.0.0.1 only); a few concurrent
writers creating ConfigMaps through it, each acknowledged (201) create recorded with
its time. Once enough writes are in, the current leader (found through each member's
``/v3/maintenance/status`` on the grpc-gateway) is killed with SIGKILL. Writes must
resume after the election; the gap is measured and printed. At the end every
acknowledged write must be readable, key by key, through the apiserver and directly
from the surviving etcd members.

A create that failed with a 5xx or a transport error is ambiguous (etcd may have
committed it); the writer retries the same name, and a 409 on such a retry counts as
"committed, not acknowledged" — present, but not part of the promise checked here.

Bounded: ``WRITES_BEFORE``/``WRITES_AFTER`` acknowledged writes, ``DEADLINE`` seconds in
all; every process is killed by pid in ``finally`` (etcd by the fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.tiers import require, require_commands
from tests.unit.store.etcd_fixture import EtcdCluster, EtcdMember, _free_port, etcd_cluster

pytestmark = pytest.mark.etcd

WRITERS = 4
WRITES_BEFORE = 60  # acknowledged creates before the leader is killed
WRITES_AFTER = 120  # ... and after it
DEADLINE = 90.0  # the whole write phase
REQUEST_TIMEOUT = 15.0  # > the store's own 10 s gRPC timeout, so the server answers first
NAMESPACE = "default"


@dataclass
class Ledger:
    """What the writers saw: acknowledged names with their ack times, and the rest."""

    acked: dict[str, float] = field(default_factory=dict)
    maybe: set[str] = field(default_factory=set)  # 409 after an ambiguous failure
    statuses: Counter[str] = field(default_factory=Counter)
    failure_times: list[float] = field(default_factory=list)


def _gateway(member: EtcdMember, path: str, body: dict[str, str]) -> dict[str, Any] | None:
    """POST to etcd 3.4's grpc-gateway (``/v3/...``; int64s arrive as strings)."""
    req = urllib.request.Request(
        f"{member.client_url}/v3/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            out = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _member_status(member: EtcdMember) -> dict[str, Any] | None:
    return _gateway(member, "maintenance/status", {})


def move_leader(cluster: EtcdCluster, target: EtcdMember) -> None:
    """Hand leadership to ``target`` (MoveLeader must be sent to the current leader)."""
    leader = find_leader(cluster)
    if leader is target:
        return
    st = _member_status(target)
    assert st is not None, f"{target.name} has no status"
    out = _gateway(
        leader, "maintenance/transfer-leadership", {"targetID": str(st["header"]["member_id"])}
    )
    assert out is not None, "transfer-leadership failed"
    deadline = time.monotonic() + 10
    while find_leader(cluster) is not target:
        assert time.monotonic() < deadline, "leadership did not move"
        time.sleep(0.1)


def find_leader(cluster: EtcdCluster, timeout: float = 10.0) -> EtcdMember:
    """The member whose id is the leader every live member reports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids: dict[str, EtcdMember] = {}
        leaders: set[str] = set()
        for m in cluster.members:
            if m.proc is None:
                continue
            st = _member_status(m)
            if st is None:
                continue
            ids[str(st["header"]["member_id"])] = m
            leaders.add(str(st.get("leader", "0")))
        if len(leaders) == 1 and (leader := leaders.pop()) in ids:
            return ids[leader]
        time.sleep(0.1)
    raise AssertionError(f"no agreed etcd leader within {timeout} s\n{cluster.log_tail()}")


@contextlib.contextmanager
def apiserver_process(tmp: Path, cluster: EtcdCluster) -> Iterator[str]:
    """``kproxy apiserver`` on etcd; yields its plain-HTTP URL; killed by pid on exit."""
    port = _free_port()
    log_path = tmp / "apiserver.log"
    argv = [
        sys.executable,
        "-m",
        "kproxy.cli",
        "apiserver",
        "--storage-backend=etcd3",
        "--etcd-servers=" + ",".join(f"http://{e}" for e in cluster.endpoints),
        f"--data-dir={tmp / 'apiserver'}",
        "--bind-address=127.0.0.1",
        f"--secure-port={_free_port()}",
        f"--insecure-port={port}",
        "--insecure-bind-address=127.0.0.1",
        "--etcd-compaction-interval=0",
    ]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "apiserver did not start:\n" + log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


async def _writer(
    session: aiohttp.ClientSession,
    url: str,
    wid: int,
    ledger: Ledger,
    stop: asyncio.Event,
    deadline: float,
) -> None:
    seq = 0
    ambiguous = False  # the last attempt at this name may have committed
    while not stop.is_set() and time.monotonic() < deadline:
        name = f"w{wid}-{seq:05d}"
        body = {"metadata": {"name": name}, "data": {"writer": str(wid), "seq": str(seq)}}
        try:
            async with session.post(
                f"{url}/api/v1/namespaces/{NAMESPACE}/configmaps",
                json=body,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, ambiguous = 0, True
            ledger.statuses[type(exc).__name__] += 1
        else:
            ledger.statuses[str(status)] += 1
        if status == 201:
            ledger.acked[name] = time.monotonic()
            seq, ambiguous = seq + 1, False
        elif status == 409 and ambiguous:
            ledger.maybe.add(name)
            seq, ambiguous = seq + 1, False
        else:
            assert status == 0 or status >= 500, f"{name}: unexpected {status}"
            ambiguous = True
            ledger.failure_times.append(time.monotonic())
            await asyncio.sleep(0.05)


async def _write_through_failover(
    url: str, cluster: EtcdCluster
) -> tuple[Ledger, float, EtcdMember]:
    ledger = Ledger()
    stop = asyncio.Event()
    deadline = time.monotonic() + DEADLINE
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(_writer(session, url, i, ledger, stop, deadline))
            for i in range(WRITERS)
        ]
        try:
            while len(ledger.acked) < WRITES_BEFORE and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(ledger.acked) >= WRITES_BEFORE, "writes did not start"
            leader = await asyncio.to_thread(find_leader, cluster)
            assert leader.proc is not None
            killed_at = time.monotonic()
            leader.proc.kill()  # SIGKILL: no graceful leadership transfer
            await asyncio.to_thread(leader.proc.wait, 5)
            leader.proc = None
            before = len(ledger.acked)
            while len(ledger.acked) < before + WRITES_AFTER and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=False)
    return ledger, killed_at, leader


async def _verify(url: str, cluster: EtcdCluster, ledger: Ledger) -> None:
    from kproxy.store.etcd import EtcdStore

    async with aiohttp.ClientSession() as session:
        for name in sorted(ledger.acked):
            async with session.get(
                f"{url}/api/v1/namespaces/{NAMESPACE}/configmaps/{name}"
            ) as resp:
                assert resp.status == 200, (name, resp.status, await resp.text())
                obj = await resp.json()
                assert obj["metadata"]["name"] == name
                assert obj["data"]["seq"] == str(int(name.rsplit("-", 1)[1]))
    live = [m.client_url.removeprefix("http://") for m in cluster.members if m.proc is not None]
    store = await EtcdStore.connect(live, timeout=5)
    try:
        for name in sorted(ledger.acked):
            kv = await store.get(f"/registry/configmaps/{NAMESPACE}/{name}")
            assert json.loads(kv.value)["metadata"]["name"] == name
        kvs, _ = await store.list(f"/registry/configmaps/{NAMESPACE}/w")
        stored = {kv.key.rsplit("/", 1)[1] for kv in kvs}
        # Nothing beyond what a writer tried: acknowledged, ambiguous, or in flight at stop.
        assert set(ledger.acked) <= stored
    finally:
        await store.close()


@pytest.mark.parametrize("leader", ["elected", "first-endpoint"])
def test_acknowledged_writes_survive_killing_the_etcd_leader(tmp_path: Path, leader: str) -> None:
    """``first-endpoint`` moves leadership to the member the apiserver's gRPC channel
    picked first (pick-first), so the kill also breaks the apiserver's own connection;
    ``elected`` kills whichever member won the first election."""
    require_commands("etcd")
    try:
        import aetcd  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        require(False, f"etcd backend unavailable: {exc}")
    started = time.monotonic()
    with etcd_cluster(tmp_path, size=3) as cluster, apiserver_process(tmp_path, cluster) as url:
        if leader == "first-endpoint":
            move_leader(cluster, cluster.members[0])
        ledger, killed_at, victim = asyncio.run(
            asyncio.wait_for(_write_through_failover(url, cluster), DEADLINE + 30)
        )
        acks = sorted(ledger.acked.values())
        after = [t for t in acks if t > killed_at]
        before = [t for t in acks if t <= killed_at]
        assert len(after) >= WRITES_AFTER, (
            f"writes did not resume: {len(after)} after the kill, {ledger.statuses}\n"
            f"{cluster.log_tail()}"
        )
        gap = after[0] - killed_at  # kill → first acknowledged write
        longest = max(b - a for a, b in itertools.pairwise(acks))
        asyncio.run(asyncio.wait_for(_verify(url, cluster, ledger), 60))
        index = cluster.members.index(victim)
        print(
            f"\nkilled leader {victim.name} (member {index} of the apiserver's endpoint list); "
            f"acknowledged {len(before)} before, {len(after)} after "
            f"({len(ledger.maybe)} committed-but-unacknowledged); "
            f"kill→first ack {gap:.3f} s, longest gap between acks {longest:.3f} s; "
            f"statuses {dict(ledger.statuses)}; failures during the election "
            f"{len(ledger.failure_times)}; total {time.monotonic() - started:.1f} s"
        )
