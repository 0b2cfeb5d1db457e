"""IPVS sync: kproxy's IPVS mode against ``ipvsadm -R`` on the same virtual/real servers.

Per step (``--steps``, default 100,1000,5000 ClusterIP Services × ``--endpoints``
10 endpoints) this reports, measured in one run on one kernel:

- ``ipvsadm -R`` of exactly the virtual and real servers of the plan into an
  empty table (one netlink request per line, its process start included);
- kproxy's full sync into an empty kernel (planning, ipsets, kube-ipvs0
  addresses, the IPVS batch, the iptables-restore), with its parts;
- kproxy's incremental sync after one endpoint change (the minimum of
  ``--repeats``), with its parts and the netlink operations it sent;
- ratios: full / ipvsadm -R (target <= 1.0), IPVS-batch part of the full sync /
  ipvsadm -R, and incremental at N / incremental at the smallest N (target:
  independent of N; the planner is O(N), the kernel part is not).

It needs IPVS: run it inside the VM (the host kernel has none).  From the host::

    .venv/bin/python bench/ipvs_sync.py --vm --steps 100,1000,5000

boots the Debian kernel under virtme-ng once (``--disable-kvm``), runs this
script inside and writes ``ipvs_sync.json`` to ``--out``.  Inside a guest
(``KPROXY_IN_VM=1``) run it without ``--vm``.  Every measurement (``ipvsadm``
or ``kproxy`` at one N) runs in a process and a network namespace of its own
(``kpbench-ipvs-<pid>-<measure>-<N>``, deleted in a ``finally``): the kernel
keeps deleted real servers in a per-namespace list that every add scans, so a
measurement after another in one namespace would pay for the first.  The
modules the rules use are loaded, and both sides run once on two Services
(thrown away), before the first step: as on any node, nothing is cold.  The
whole run is bounded by ``--budget`` seconds (a step whose estimate overruns it
is skipped and reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _workload as workload

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
NODE = "bench-node"
DEFAULT_STEPS = (100, 1000, 5000)
# Loaded before any step, as on any node that has run a proxy: under emulation
# loading a module costs about a second, which the first step would pay alone.
GUEST_MODULES = (
    "ip_vs", "ip_vs_rr", "dummy", "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport",
    "ip_set_hash_ipportip", "ip_set_hash_ipportnet", "ip_set_bitmap_port", "nf_conntrack",
    "iptable_nat", "iptable_filter", "xt_set", "xt_comment", "xt_mark", "xt_addrtype",
    "xt_conntrack", "xt_physdev", "xt_ipvs", "xt_MASQUERADE", "xt_nat",
)  # fmt: skip

Obj = dict[str, Any]


# -- workload ------------------------------------------------------------------
def service(i: int) -> Obj:
    return {
        "metadata": {"namespace": f"ns{i % 50}", "name": f"svc{i}"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": _host("172", (16 << 16) * 254 // 256 + i),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }


def _host(prefix: str, n: int) -> str:
    # Last octet 1..254: no network or broadcast-looking addresses.
    hi, lo = divmod(n, 254)
    return f"{prefix}.{(hi >> 8) & 255}.{hi & 255}.{lo + 1}"


def _ip(n: int) -> str:
    return _host("10", n)


def endpoint_slice(i: int, endpoints: int, first: int | None = None) -> Obj:
    return workload.endpoint_slice(i, endpoints, _ip, first)


# -- one step, inside the scratch namespace -------------------------------------
@dataclass
class Step:
    services: int
    endpoints: int
    ipvsadm_restore_s: float = 0.0
    full_s: float = 0.0
    full_parts: dict[str, float] = field(default_factory=dict)
    full_messages: int = 0
    full_round_trips: int = 0
    incremental_s: float = 0.0
    incremental_parts: dict[str, float] = field(default_factory=dict)
    incremental_ops: list[str] = field(default_factory=list)
    incremental_messages: int = 0
    incremental_round_trips: int = 0
    incremental_kernel_s: float = 0.0  # the incremental sync minus planning
    skipped: str = ""


def _ipvsadm_text(plan: Any) -> str:
    lines = []
    for planned in plan.servers:
        vs = planned.server
        svc = f"-t {vs.address}:{vs.port}"
        lines.append(f"-A {svc} -s {vs.scheduler}")
        lines += [
            f"-a {svc} -r {rs.address}:{rs.port} -m -w {rs.weight}" for rs in planned.destinations
        ]
    return "\n".join(lines) + "\n"


def _snapshot(services: int, endpoints: int) -> tuple[Any, Any]:
    core = workload.build_core(NODE, services, service, lambda i: endpoint_slice(i, endpoints))
    core.synced()
    return core, core.snapshot()


def measure_ipvsadm(services: int, endpoints: int) -> dict[str, Any]:
    """``ipvsadm -R`` of the plan's virtual and real servers into this empty namespace."""
    from kproxy.proxy.ipvs import IpvsOptions, plan_ipvs

    _, snap = _snapshot(services, endpoints)
    text = _ipvsadm_text(plan_ipvs(snap.services, snap.endpoints, IpvsOptions(node_name=NODE)))
    t = time.perf_counter()
    subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True)
    return {"ipvsadm_restore_s": time.perf_counter() - t}


def measure_kproxy(services: int, endpoints: int, repeats: int) -> dict[str, Any]:
    """kproxy's full sync into this empty namespace, then incremental syncs."""
    from kproxy.kernel.ipset import Ipset
    from kproxy.kernel.iptables import Iptables
    from kproxy.kernel.ipvs_batch import IpvsBatch
    from kproxy.kernel.links import Links
    from kproxy.proxy.ipvs import IpvsOptions
    from kproxy.proxy.ipvs.mode import IpvsMode

    out: dict[str, Any] = {}
    core, snap = _snapshot(services, endpoints)
    ipt = Iptables("ipv4", "legacy")
    # As the daemon does before its first sync (it needs --random-fully support).
    random_fully = ipt.has_random_fully()
    mode = IpvsMode(
        IpvsBatch(),
        Ipset(),
        Links(),
        ipt,
        IpvsOptions(node_name=NODE, random_fully=random_fully),
        verify_period=3600.0,
    )
    try:
        t = time.perf_counter()
        result = mode.sync(snap, True)
        out["full_s"] = time.perf_counter() - t
        if not result.ok:
            raise RuntimeError(f"full sync failed: {result.error}")
        stats = mode.last_stats
        out["full_parts"] = dict(stats.timings)
        out["full_messages"], out["full_round_trips"] = stats.messages, stats.round_trips

        old = endpoint_slice(0, endpoints)
        best = float("inf")
        for r in range(max(1, repeats)):
            # Alternate the first endpoint so each repeat is a real change.
            new = endpoint_slice(0, endpoints, first=1_000_000 + r)
            core.on_endpoint_slice(old, new)
            old = new
            s = core.snapshot()
            t = time.perf_counter()
            result = mode.sync(s, False)
            elapsed = time.perf_counter() - t
            if not result.ok:
                raise RuntimeError(f"incremental sync failed: {result.error}")
            if elapsed < best:
                best = elapsed
                stats = mode.last_stats
                out["incremental_s"] = elapsed
                out["incremental_parts"] = dict(stats.timings)
                out["incremental_ops"] = [str(op) for op in stats.ops]
                out["incremental_messages"] = stats.messages
                out["incremental_round_trips"] = stats.round_trips
                out["incremental_kernel_s"] = elapsed - stats.timings.get("plan", 0.0)
        mode.cleanup()
    finally:
        mode.close()
    return out


# -- orchestration --------------------------------------------------------------
def _inside(netns: str) -> bool:
    """Whether this process runs in the named network namespace (and no other)."""
    try:
        mine = os.stat("/proc/self/ns/net")
        named = os.stat(f"/run/netns/{netns}")
    except OSError:
        return False
    return bool(netns) and (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def worker(args: argparse.Namespace) -> int:
    """Inside a fresh namespace: one measurement of one step, a JSON line on stdout."""
    if not _inside(args.netns):
        # It programs IPVS, ipsets, kube-ipvs0 and iptables: only in the namespace made
        # for it, never the machine's own.
        print("--worker runs only inside the namespace in_guest() made for it", file=sys.stderr)
        return 2
    n = args.steps[0]
    if args.worker == "ipvsadm":
        out = measure_ipvsadm(n, args.endpoints)
    else:
        out = measure_kproxy(n, args.endpoints, args.repeats)
    print(json.dumps(out), flush=True)
    return 0


def ratios(steps: list[Step]) -> dict[str, Any]:
    done = [s for s in steps if not s.skipped]
    out: dict[str, Any] = {}
    if not done:
        return out
    base = done[0]
    for s in done:
        out[str(s.services)] = {
            "full/ipvsadm-R": s.full_s / s.ipvsadm_restore_s,
            "full-ipvs-batch/ipvsadm-R": s.full_parts.get("ipvs", 0.0) / s.ipvsadm_restore_s,
            "incremental/incremental@smallest": s.incremental_s / base.incremental_s,
            "incremental-kernel/incremental-kernel@smallest": (
                s.incremental_kernel_s / base.incremental_kernel_s
            ),
        }
    return out


def report(steps: list[Step], out_dir: Path) -> None:
    head = (
        f"{'services':>8} {'ipvsadm -R':>11} {'full':>9} {'full:ipvs':>10} {'ratio':>6} "
        f"{'incr':>9} {'incr-plan':>10} {'ops':>4} {'msgs':>5} {'rtt':>4}"
    )
    print(head)
    for s in steps:
        if s.skipped:
            print(f"{s.services:>8} skipped ({s.skipped})")
            continue
        print(
            f"{s.services:>8} {s.ipvsadm_restore_s:>10.3f}s {s.full_s:>8.3f}s "
            f"{s.full_parts.get('ipvs', 0):>9.3f}s {s.full_s / s.ipvsadm_restore_s:>6.2f} "
            f"{s.incremental_s:>8.4f}s {s.incremental_kernel_s:>9.4f}s "
            f"{len(s.incremental_ops):>4} {s.incremental_messages:>5} "
            f"{s.incremental_round_trips:>4}"
        )
    summary = {"steps": [asdict(s) for s in steps], "ratios": ratios(steps)}
    print(json.dumps(summary["ratios"], indent=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ipvs_sync.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out_dir / 'ipvs_sync.json'}")


def _in_fresh_namespace(args: argparse.Namespace, measure: str, n: int, timeout: float) -> Any:
    """Run one measurement in a namespace made for it; delete the namespace always.

    A fresh namespace per measurement, because the kernel keeps deleted real
    servers in a per-namespace trash list for minutes and scans it on every add:
    ``ipvsadm -R`` after a flush of 50,000 real servers took twice as long as
    into a fresh namespace, so whichever side ran second paid for the first.
    """
    ns = f"kpbench-ipvs-{os.getpid()}-{measure}-{n}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # Without lo up a new namespace has no local routing table, and the kernel
        # then calls every real-server address non-unicast (EINVAL on add).
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        argv = [
            "ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()),
            "--worker", measure, "--netns", ns, "--steps", str(n),
            "--endpoints", str(args.endpoints), "--repeats", str(args.repeats),
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{measure} at {n} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def in_guest(args: argparse.Namespace) -> int:
    """Every step: ipvsadm -R and kproxy, each in a fresh namespace; report."""
    for module in GUEST_MODULES:
        subprocess.run(["modprobe", module], check=False)
    budget_end = time.monotonic() + args.budget
    # One small run of each side first, thrown away: the guest reads its files over
    # 9p, and the first start of ipvsadm or iptables-restore (a dozen extension
    # libraries) from a cold page cache took seconds the steps must not measure.
    _in_fresh_namespace(args, "ipvsadm", 2, 600)
    _in_fresh_namespace(args, "kproxy", 2, 600)
    steps: list[Step] = []
    last: Step | None = None
    for n in args.steps:
        if last is not None:
            estimate = (
                (last.full_s + last.ipvsadm_restore_s + last.incremental_s) * n / last.services
            )
            if time.monotonic() + 2 * estimate > budget_end:
                steps.append(Step(n, args.endpoints, skipped="budget"))
                continue
        left = max(60.0, budget_end - time.monotonic()) + 120
        fields = _in_fresh_namespace(args, "ipvsadm", n, left)
        fields |= _in_fresh_namespace(args, "kproxy", n, left)
        last = Step(n, args.endpoints, **fields)
        steps.append(last)
        print(json.dumps(asdict(last)), flush=True)
    report(steps, args.out)
    return 0


def boot_vm(args: argparse.Namespace) -> int:
    """From the host: one virtme-ng boot running this script inside."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*-amd64"))
    # vng runs virtme-run from the venv's bin/ by name: it must be on PATH.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    vng = shutil.which("vng", path=path)
    if not kernels or vng is None:
        print("need /boot/vmlinuz-*-amd64 and virtme-ng (vng)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    inner = shlex.join(
        [
            sys.executable, str(Path(__file__).resolve()),
            "--steps", ",".join(map(str, args.steps)), "--endpoints", str(args.endpoints),
            "--repeats", str(args.repeats), "--budget", str(args.budget), "--out", str(args.out),
        ]
    )  # fmt: skip
    cmd = [
        vng, "--run", str(kernels[-1]), "--disable-kvm", "--memory", "2G",
        "--rwdir", str(args.out), "--cwd", str(REPO),
        "--exec", f"env KPROXY_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 {inner}",
    ]  # fmt: skip
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(
        cmd,
        timeout=args.budget + 600,
        check=False,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": path},
    )
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_STEPS)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=900.0, help="seconds for all steps")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--vm", action="store_true", help="boot the VM and run inside it")
    p.add_argument("--worker", choices=("ipvsadm", "kproxy"), help=argparse.SUPPRESS)
    p.add_argument("--netns", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = list(args.steps)
    if args.worker:
        return worker(args)
    if args.vm:
        return boot_vm(args)
    if os.environ.get("KPROXY_IN_VM") != "1":
        print("IPVS is only in the VM: pass --vm (or run inside a guest)", file=sys.stderr)
        return 2
    return in_guest(args)


if __name__ == "__main__":
    sys.exit(main())
