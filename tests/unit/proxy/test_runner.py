"""The bounded-frequency runner's policy, on a virtual clock and for real."""

from __future__ import annotations

import asyncio
import math

from kproxy.proxy.runner import BoundedFrequencyRunner, RunnerState, next_due


def test_idle_runner_waits_for_the_periodic_sync() -> None:
    assert next_due(RunnerState(periodic_at=3600.0), 1.0) == 3600.0


def test_request_waits_for_min_interval_since_last_start() -> None:
    state = RunnerState(last_start=10.0, pending=True, periodic_at=3610.0)
    assert next_due(state, 1.0) == 11.0
    assert next_due(state, 0.0) == 10.0  # min-sync-period 0: every change syncs at once


def test_first_request_runs_at_once() -> None:
    state = RunnerState(last_start=-math.inf, pending=True, periodic_at=3600.0)
    assert next_due(state, 1.0) == -math.inf


def test_retry_after_failure_respects_min_interval() -> None:
    state = RunnerState(last_start=10.0, retry_at=40.0, periodic_at=3610.0)
    assert next_due(state, 1.0) == 40.0
    state = RunnerState(last_start=10.0, retry_at=10.5, periodic_at=3610.0)
    assert next_due(state, 1.0) == 11.0


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_coalescing_failure_retry_and_periodic_on_a_virtual_clock() -> None:
    clock = VirtualClock()
    starts: list[float] = []
    fail = {"next": False}

    async def sync() -> None:
        starts.append(clock.now)
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("restore failed")

    async def scenario() -> None:
        runner = BoundedFrequencyRunner("t", sync, 1.0, 30.0, 3600.0, clock=clock)

        async def step() -> None:
            # Run the loop until it has nothing due at the current virtual time.
            while next_due(runner.state, 1.0) <= clock.now:
                await runner._run_once()

        runner.run()
        runner.run()
        await step()
        assert starts == [1000.0]  # two requests, one sync
        runner.run()
        await step()
        assert starts == [1000.0]  # too soon
        clock.now = 1001.0
        fail["next"] = True
        await step()
        assert starts == [1000.0, 1001.0] and runner.failures == 1
        clock.now = 1030.0
        await step()
        assert len(starts) == 2  # retry not yet due
        clock.now = 1031.0
        await step()
        assert starts[-1] == 1031.0  # the retry
        clock.now = 1031.0 + 3600.0
        await step()
        assert starts[-1] == 4631.0  # periodic sync without any request

    asyncio.run(scenario())


def test_real_loop_coalesces_and_stops() -> None:
    calls: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def sync() -> None:
            calls.append(loop.time())

        runner = BoundedFrequencyRunner("t", sync, 0.2, 5.0, 60.0)
        task = asyncio.create_task(runner.loop())
        for _ in range(20):
            runner.run()
        await asyncio.sleep(0.05)
        for _ in range(20):
            runner.run()
        await asyncio.sleep(0.5)
        runner.stop()
        await asyncio.wait_for(task, 2.0)

    asyncio.run(scenario())
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.19
