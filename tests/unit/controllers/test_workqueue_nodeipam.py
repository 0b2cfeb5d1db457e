"""The work queue (dedup, no concurrent key, backoff, timers) and podCIDR allocation."""

from __future__ import annotations

import asyncio

import pytest

from kproxy.controllers.nodeipam import CidrAllocator, CidrError, CidrSet
from kproxy.controllers.workqueue import RateLimiter, WorkQueue, run_workers


def test_dedup_and_dirty_while_processing() -> None:
    async def main() -> None:
        q = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        key = await q.get()
        assert key == "a"
        q.add("a")  # being processed: remembered, not queued twice
        assert len(q) == 1
        q.done("a")
        assert [await q.get(), await q.get()] == ["b", "a"]

    asyncio.run(main())


def test_rate_limiter_backoff() -> None:
    r = RateLimiter(base=0.01, cap=0.05)
    assert [r.when("k") for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    r.forget("k")
    assert r.when("k") == 0.01


def test_workers_retry_failures_and_timers() -> None:
    async def main() -> None:
        q = WorkQueue(rate_limiter=RateLimiter(base=0.001, cap=0.01))
        calls: list[str] = []
        active: set[str] = set()
        overlap = False

        async def reconcile(key: str) -> float | None:
            nonlocal overlap
            overlap |= key in active
            active.add(key)
            await asyncio.sleep(0.001)
            active.discard(key)
            calls.append(key)
            if key == "flaky" and calls.count("flaky") < 3:
                raise RuntimeError("boom")
            if key == "timer" and calls.count("timer") == 1:
                return 0.01
            return None

        task = asyncio.create_task(run_workers(q, reconcile, workers=4))
        for _ in range(5):
            q.add("same")
        q.add("flaky")
        q.add("timer")
        async with asyncio.timeout(5):
            while calls.count("flaky") < 3 or calls.count("timer") < 2:
                await asyncio.sleep(0.005)
        assert not overlap
        assert q.num_requeues("flaky") == 0  # forgotten after success
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_cidr_set_allocates_without_duplicates_and_reuses() -> None:
    s = CidrSet("10.244.0.0/22", 24)
    assert s.size == 4
    s.occupy("10.244.1.0/24")  # an existing node's, read on start
    got = [s.allocate() for _ in range(3)]
    assert got == ["10.244.0.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    with pytest.raises(CidrError):
        s.allocate()
    s.release("10.244.2.0/24")
    assert s.allocate() == "10.244.2.0/24"


@pytest.mark.parametrize(
    ("cidr", "mask"),
    [("10.0.0.0/24", 16), ("10.0.0.1/16", 24), ("nonsense", 24)],
)
def test_cidr_set_rejects(cidr: str, mask: int) -> None:
    with pytest.raises(CidrError):
        CidrSet(cidr, mask)


def test_dual_stack_allocator() -> None:
    a = CidrAllocator("10.244.0.0/16,fd00:10::/56", 24, 64)
    assert a.allocate() == ["10.244.0.0/24", "fd00:10::/64"]
    a.occupy(["10.244.1.0/24", "fd00:10:0:1::/64"])
    assert a.allocate() == ["10.244.2.0/24", "fd00:10:0:2::/64"]
    with pytest.raises(CidrError):
        CidrAllocator("10.0.0.0/16,10.1.0.0/16")
