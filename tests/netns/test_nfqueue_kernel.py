"""The NFQUEUE kernel wrapper against the real kernel, in a throwaway namespace.

A one-packet queue that nobody serves: with the fail-open flag (set by
:class:`kproxy.kernel.nfqueue.NfQueue` through its own netlink config message)
the packets that do not fit are accepted; without it the kernel drops them and
counts them in ``/proc/net/netfilter/nfnetlink_queue``, which
:func:`kproxy.kernel.nfqueue.read_queue_stats` reads. Also: the copy range is
the headers-only default, and a served queue marks packets.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.netns import NetnsFactory
from tests.support.tiers import require_module

pytestmark = pytest.mark.netns

PROBE = r"""
import json, socket, sys, time
from kproxy.kernel.nfqueue import NfQueue, read_queue_stats
fail_open, serve = sys.argv[1] == "1", sys.argv[2] == "1"
seen = []
def cb(pkt):
    seen.append(len(pkt.get_payload()))
    pkt.set_mark(0x10000)
    pkt.accept()
q = NfQueue(0, cb, max_len=1, fail_open=fail_open)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 5000))
rx.settimeout(0.3)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(5):
    tx.sendto(b"x" * 500, ("127.0.0.1", 5000))
if serve:
    for _ in range(20):
        q.process_pending()
        time.sleep(0.01)
got = 0
try:
    while True:
        rx.recv(2048)
        got += 1
except TimeoutError:
    pass
st = read_queue_stats()[0]
print(json.dumps({"got": got, "fail_open": q.fail_open, "dropped": st.queue_dropped,
                  "copy_range": st.copy_range, "seen": seen}))
q.close()
"""


@pytest.mark.parametrize(("fail_open", "serve"), [(True, False), (False, False), (True, True)])
def test_fail_open_copy_range_and_drop_counters(
    netns: NetnsFactory, fail_open: bool, serve: bool
) -> None:
    require_module("netfilterqueue")
    ns = netns()
    ns.run(
        ["iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "5000",
         "-j", "NFQUEUE", "--queue-num", "0"]
    )  # fmt: skip
    res = ns.run([sys.executable, "-c", PROBE, str(int(fail_open)), str(int(serve))], timeout=30)
    out = json.loads(res.stdout)
    assert out["copy_range"] == 128 and out["fail_open"] == fail_open
    if serve:
        assert out["got"] == 5 and out["dropped"] == 0
        assert out["seen"] and all(n == 128 for n in out["seen"])  # headers only
    elif fail_open:
        # One packet waits in the queue; the other four were accepted, not dropped.
        assert (out["got"], out["dropped"]) == (4, 0)
    else:
        assert (out["got"], out["dropped"]) == (0, 4)
