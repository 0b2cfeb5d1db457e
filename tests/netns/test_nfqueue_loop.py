"""The fast path's NfqLoop behind a real NFQUEUE, in a throwaway namespace, both builds.

UDP datagrams from distinct source ports are queued in mangle OUTPUT; a
process serves the queue with ``NfqLoop`` (the compiled C loop, then the
twin) and a Maglev service. Counting rules in mangle POSTROUTING, one per
mark, show what the kernel applied: exactly the Maglev choice per 5-tuple,
with the mark bit set before queueing (outside the mask) kept. Every packet
is delivered; the queue flags are set; a queue bound by a stopped loop is gone.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from kproxy.proxy.nfqueue.rules import MARK_MASK
from tests.support.netns import NetnsFactory
from tests.support.tiers import require_module

pytestmark = pytest.mark.netns

EPS = ("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")
SPORTS = range(20000, 20300)
M = 1021

SERVE = r"""
import importlib, json, socket, sys, time
impl = importlib.import_module(sys.argv[1])
eps = tuple(sys.argv[2].split(","))
loop = impl.NfqLoop([0], mark_mask=int(sys.argv[3]))
loop.open()
mg = impl.Maglev(eps, None, int(sys.argv[4]))
marks = [(i + 1) << 16 for i in range(len(eps))]
loop.set_services([("svc", [socket.inet_aton("127.0.0.1")], 5000, 17, mg, None, marks, False)])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE: hold every datagram
rx.bind(("127.0.0.1", 5000))
rx.settimeout(0.5)
print("ready", flush=True)
deadline = time.monotonic() + 20
got = 0
while time.monotonic() < deadline and got < int(sys.argv[5]):
    loop.run(0.05)
    try:
        while True:
            rx.recv(256)
            got += 1
            rx.settimeout(0.001)
    except (TimeoutError, BlockingIOError):
        pass
st = loop.stats()
print(json.dumps({"got": got, "packets": st["packets"], "fail_open": loop.fail_open,
                  "gso": loop.gso, "marked": loop.take_marked(), "errors": st["errors"]}))
loop.close()
"""

SEND = r"""
import socket, sys
for sport in range(int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", sport))
    s.sendto(b"hello", ("127.0.0.1", 5000))
    s.close()
"""


def _impls() -> list[str]:
    out = ["kproxy._fastpath_py"]
    try:
        importlib.import_module("kproxy._fastpath")
        out.insert(0, "kproxy._fastpath")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("module", _impls())
def test_loop_marks_each_flow_with_its_maglev_endpoint(netns: NetnsFactory, module: str) -> None:
    if module == "kproxy._fastpath_py":
        require_module("netfilterqueue")
    impl = importlib.import_module(module)
    ns = netns()
    ipt = ["iptables-nft", "-t", "mangle"]
    # A mark bit outside the mask, set before queueing: the loop must keep it.
    ns.run(
        [
            *ipt,
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "5000",
            "-j",
            "MARK",
            "--set-xmark",
            "0x1/0x1",
        ]
    )
    ns.run(
        [*ipt, "-A", "OUTPUT", "-p", "udp", "--dport", "5000",
         "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
    )  # fmt: skip
    for i in range(len(EPS)):
        mark = ((i + 1) << 16) | 1
        ns.run([*ipt, "-A", "POSTROUTING", "-p", "udp", "--dport", "5000",
                "-m", "mark", "--mark", f"{mark:#x}/{MARK_MASK | 1:#x}"])  # fmt: skip
    serve = subprocess.Popen(
        ns.argv([sys.executable, "-c", SERVE, module, ",".join(EPS), str(MARK_MASK), str(M),
                 str(len(SPORTS))]),
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        assert serve.stdout.readline().strip() == "ready"
        ns.run([sys.executable, "-c", SEND, str(SPORTS.start), str(SPORTS.stop)], timeout=30)
        out = json.loads(serve.communicate(timeout=40)[0].strip().splitlines()[-1])
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
    assert out["got"] == len(SPORTS) and out["packets"] == len(SPORTS) and out["errors"] == 0
    assert out["fail_open"] and out["gso"]
    assert out["marked"] == [["svc", len(SPORTS)]]
    mg = impl.Maglev(EPS, None, M)
    want = [0] * len(EPS)
    for sport in SPORTS:
        want[EPS.index(mg.select((17, "127.0.0.1", sport, "127.0.0.1", 5000)))] += 1
    save = ns.run(["iptables-nft-save", "-c", "-t", "mangle"]).stdout
    got = [
        int(line.split("]")[0].split(":")[0].lstrip("["))
        for line in save.splitlines()
        if line.startswith("[") and "-A POSTROUTING" in line and "--mark" in line
    ]
    assert got == want and sum(want) == len(SPORTS) and min(want) > 0
    # The loop is gone: nothing is bound any more.
    assert not ns.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.strip()
