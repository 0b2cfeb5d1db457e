"""The container state machine: restarts per policy with back-off, image errors, stops."""

from __future__ import annotations

from kproxy.kubelet.backoff import CrashBackoff
from kproxy.kubelet.container import Container, will_restart
from kproxy.kubelet.images import ERR_IMAGE_PULL, IMAGE_PULL_BACKOFF
from kproxy.kubelet.process import Process


def make() -> Container:
    return Container(spec={"name": "c", "image": "kproxy/echo"}, pod_label="ns/p",
                     backoff=CrashBackoff(initial=10, cap=40))  # fmt: skip


def test_restart_policy_table() -> None:
    assert will_restart("Always", 0) and will_restart("Always", 1)
    assert not will_restart("OnFailure", 0) and will_restart("OnFailure", 1)
    assert not will_restart("Never", 1)


def test_crash_loop_counts_and_backs_off() -> None:
    c = make()
    assert c.should_start(0.0)
    c.on_started(Process(10, 1, None), 0.0, "w0")
    assert c.restart_count == 0 and c.status()["state"] == {"running": {"startedAt": "w0"}}
    c.on_exit(1, "Always", 2.0, "w2")
    st = c.status()
    assert st["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert "back-off 10s" in st["state"]["waiting"]["message"]
    assert st["lastState"]["terminated"]["exitCode"] == 1
    assert not c.should_start(11.9) and c.should_start(12.0)
    c.on_started(Process(11, 2, None), 12.0, "w12")
    assert c.restart_count == 1
    c.on_exit(1, "Always", 13.0, "w13")
    assert c.restart_at == 33.0  # 20 s now


def test_never_policy_stays_terminated() -> None:
    c = make()
    c.on_started(Process(10, 1, None), 0.0, "w0")
    c.on_exit(0, "Never", 1.0, "w1")
    assert c.status()["state"]["terminated"]["reason"] == "Completed"
    assert not c.should_start(1000.0)


def test_image_errors_back_off() -> None:
    c = make()
    c.image_failed(ERR_IMAGE_PULL, "nope", 0.0)
    assert c.status()["state"]["waiting"]["reason"] == ERR_IMAGE_PULL
    assert not c.should_start(5.0) and c.should_start(10.0)
    c.image_failed(ERR_IMAGE_PULL, "nope", 10.0)
    assert c.status()["state"]["waiting"]["reason"] == IMAGE_PULL_BACKOFF
    assert c.restart_count == 0 and not c.ever_started


def test_termination_keeps_it_down() -> None:
    c = make()
    c.on_started(Process(10, 1, None), 0.0, "w0")
    c.request_stop(1.0, 30.0, "liveness")
    c.request_stop(2.0, 5.0, "terminate")
    assert c.kill_deadline == 7.0 and c.stop_purpose == "terminate"
    assert not c.ready
    c.on_exit(143, "Always", 3.0, "w3")
    assert c.status()["state"]["terminated"]["exitCode"] == 143
    assert not c.should_start(100.0)
