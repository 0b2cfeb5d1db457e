"""The probe state machine on a fake clock, and the handlers against local servers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from kproxy.kubelet.container import Container
from kproxy.kubelet.probes import ProbeSpec, ProbeTarget, ProbeTracker, run_handler
from kproxy.kubelet.process import Process


def spec(ptype: str = "readiness", **fields: object) -> ProbeSpec:
    raw = {"httpGet": {"port": 80}, **fields}
    parsed = ProbeSpec.parse(ptype, raw)  # type: ignore[arg-type]
    assert parsed is not None
    return parsed


def test_defaults_and_clamping() -> None:
    s = spec("liveness", successThreshold=5, periodSeconds=0)
    assert (s.initial_delay, s.period, s.timeout, s.failure_threshold) == (0, 1, 1, 3)
    assert s.success_threshold == 1  # forced for liveness
    assert spec("readiness", successThreshold=2).success_threshold == 2
    assert ProbeSpec.parse("readiness", {"periodSeconds": 1}) is None


def test_initial_results() -> None:
    assert ProbeTracker(spec("readiness"), 0.0).result is False
    assert ProbeTracker(spec("startup"), 0.0).result is False
    assert ProbeTracker(spec("liveness"), 0.0).result is True


def test_due_respects_initial_delay_and_period() -> None:
    t = ProbeTracker(spec(initialDelaySeconds=5, periodSeconds=2), started_at=100.0)
    assert not t.due(104.9)
    assert t.due(105.0)
    t.begin(105.0)
    assert not t.due(106.0)  # in flight
    t.observe(True)
    assert not t.due(106.9)
    assert t.due(107.0)
    assert t.next_due() == 107.0


def test_thresholds_flip_the_result() -> None:
    t = ProbeTracker(spec(failureThreshold=3, successThreshold=2), 0.0)
    clock = 0.0

    def attempt(ok: bool) -> bool:
        nonlocal clock
        clock += 10
        t.begin(clock)
        return t.observe(ok)

    assert attempt(True) is False and t.result is False  # one success of two
    assert attempt(True) is True and t.result is True
    assert attempt(False) is False and attempt(False) is False
    assert t.result is True
    assert attempt(False) is True and t.result is False
    assert attempt(True) is False  # a success resets the failure count
    assert attempt(True) is True


def test_startup_probe_holds_others_off_then_stops() -> None:
    c = Container(
        spec={
            "name": "app",
            "image": "kproxy/echo",
            "startupProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1, "failureThreshold": 5},
            "livenessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1},
            "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1},
        },
        pod_label="ns/p",
    )
    c.on_started(Process(1, 1, None), now=0.0, wall="t")
    due = c.due_probes(0.0)
    assert [t.spec.probe_type for t in due] == ["startup"]
    assert not c.started and not c.ready
    due[0].begin(0.0)
    due[0].observe(True)
    assert c.started and not c.ready  # readiness has not said yes yet
    assert [t.spec.probe_type for t in c.due_probes(1.0)] == ["liveness", "readiness"]
    assert c.probes["startup"].done


def test_liveness_failure_is_reported() -> None:
    c = Container(
        spec={"name": "app", "image": "x",
              "livenessProbe": {"exec": {"command": ["false"]}, "failureThreshold": 2}},
        pod_label="ns/p",
    )  # fmt: skip
    c.on_started(Process(1, 1, None), now=0.0, wall="t")
    live = c.probes["liveness"]
    for now in (0.0, 10.0):
        live.begin(now)
        live.observe(False)
    assert c.liveness_failed()


def _target(port: int) -> ProbeTarget:
    def argv(cmd: Sequence[str]) -> list[str]:
        return list(cmd)

    return ProbeTarget(pod_ip="127.0.0.1", ports={"web": port}, exec_argv=argv)


def test_handlers_against_local_servers() -> None:
    async def main() -> None:
        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            code = 200 if b"/ok" in line else 500
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(http, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = _target(port)
        async with server:
            ok = ProbeSpec.parse("readiness", {"httpGet": {"path": "/ok", "port": "web"}})
            bad = ProbeSpec.parse("readiness", {"httpGet": {"path": "/bad", "port": port}})
            tcp = ProbeSpec.parse("liveness", {"tcpSocket": {"port": port}})
            assert ok and bad and tcp
            assert (await run_handler(ok, target))[0] is True
            result, why = await run_handler(bad, target)
            assert result is False and "500" in why
            assert (await run_handler(tcp, target))[0] is True
        closed = ProbeSpec.parse("liveness", {"tcpSocket": {"port": port}})
        assert closed is not None
        assert (await run_handler(closed, target))[0] is False
        yes = ProbeSpec.parse("liveness", {"exec": {"command": [sys.executable, "-c", "0"]}})
        no = ProbeSpec.parse("liveness", {"exec": {"command": ["/bin/sh", "-c", "exit 3"]}})
        slow = ProbeSpec.parse(
            "liveness", {"exec": {"command": ["/bin/sh", "-c", "sleep 5"]}, "timeoutSeconds": 1}
        )
        assert yes and no and slow
        assert (await run_handler(yes, target))[0] is True
        assert (await run_handler(no, target)) == (False, "exit 3: ")
        result, why = await run_handler(slow, target)
        assert result is False and "timeout" in why

    asyncio.run(main())
