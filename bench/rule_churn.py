"""Rule churn: render and apply the iptables ruleset as the Service count grows.

Per step (``--steps``, default 100,1000,5000,10000 Services × ``--endpoints`` 10
ready endpoints; every other Service is a NodePort) this reports:

- render time of the full restore input with the compiled fast path and with
  its pure twin, on the same objects in the same process, and their ratio;
- for each backend (``legacy``, ``nft``), in a fresh network namespace made for
  it: the apply time of that full input through ``iptables-restore --noflush
  --counters`` into an empty table, then a partial sync after one endpoint
  change (render of the partial input + its restore through
  :class:`kproxy.kernel.iptables.Iptables`), and a bare ``iptables-restore`` of
  exactly the lines that partial sync wrote (no kproxy code at all);
- the ratios the targets are about: full render / full apply (target ≤ 5 % at
  10k×10), partial sync / bare restore of its lines (target ≤ 1.2), and
  partial / full per backend.  Targets are reported, never asserted.

The partial sync runs as kproxy's iptables mode does in large-cluster mode
(more than 1,000 endpoints, i.e. every step above 100 Services): no
``iptables-save`` before it, so the replaced endpoint's old SEP chain is left
for the periodic cleanup.  Partial syncs alternate the changed endpoint between
two addresses so that each repeat is a real change; times are the minimum of
``--repeats`` (renders) or ``--partial-repeats`` (partial sync and bare restore
pairs): the machine may be shared, and the minimum is the least noisy estimate
of the cost itself.

Safety: every restore runs inside a namespace named ``kpbench-<pid>-...``
created here and deleted in a ``finally``; the root namespace is never
touched.  The whole run is bounded by ``--budget`` seconds: a kernel stage whose
estimate (the previous step's time scaled by the Service count) would overrun
it is skipped and reported as skipped.

Output: a table on stdout, ``rule_churn.csv`` / ``rule_churn.json`` and
``rule_churn.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _workload as workload
from kproxy import _fastpath_py, fastpath
from kproxy.errors import KProxyError
from kproxy.kernel.iptables import Iptables
from kproxy.proxy.core import ProxyCore
from kproxy.proxy.iptables.chains import LocalDetector, RenderOptions
from kproxy.proxy.iptables.render import IPTablesRenderer, RenderResult

DEFAULT_STEPS = (100, 1000, 5000, 10000)
BACKENDS = ("legacy", "nft")
NODE = "bench-node"
CLUSTER_CIDR = "10.0.0.0/8"
OUT = Path(__file__).resolve().parent / "out"
RENDER_TARGET = 0.05  # full render / full apply at the largest step
OVERHEAD_TARGET = 1.2  # partial sync / bare restore of its lines

Obj = dict[str, Any]


# -- workload ------------------------------------------------------------------
def service(i: int) -> Obj:
    """Service ``i``: ClusterIP, or NodePort for odd ``i``; one named TCP port."""
    port: Obj = {"name": "http", "port": 80, "protocol": "TCP"}
    spec: Obj = {
        "type": "ClusterIP",
        "clusterIP": f"172.{16 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",
        "ports": [port],
    }
    if i % 2:
        spec["type"] = "NodePort"
        port["nodePort"] = 30000 + i % 2768
    return {"metadata": {"namespace": f"ns{i % 50}", "name": f"svc{i}"}, "spec": spec}


def _ip(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def endpoint_slice(i: int, endpoints: int, first: int | None = None) -> Obj:
    """The one EndpointSlice of Service ``i`` (``first``: the churn step's address)."""
    return workload.endpoint_slice(i, endpoints, _ip, first)


def build_core(services: int, endpoints: int) -> ProxyCore:
    """A proxy core fed the synthetic objects through its event handlers."""
    return workload.build_core(NODE, services, service, lambda i: endpoint_slice(i, endpoints))


def render_options() -> RenderOptions:
    return RenderOptions(local_detector=LocalDetector.by_cidr(CLUSTER_CIDR))


@contextlib.contextmanager
def implementation(module: ModuleType) -> Iterator[None]:
    """Point :mod:`kproxy.fastpath` at ``module`` for the duration.

    Callers look the functions up on :mod:`kproxy.fastpath` at call time, so
    this times both implementations on the very same objects in one process.
    """
    saved = {name: getattr(fastpath, name) for name in _fastpath_py.__all__}
    try:
        for name in _fastpath_py.__all__:
            setattr(fastpath, name, getattr(module, name))
        yield
    finally:
        for name, value in saved.items():
            setattr(fastpath, name, value)


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@dataclass
class RenderTimes:
    cold_s: float  # first render of a new renderer (hashes every chain name)
    warm_s: float  # steady state: the next full render


def time_render(core: ProxyCore, module: ModuleType, repeats: int) -> RenderTimes:
    snap = core.snapshot()
    with implementation(module):
        renderer = IPTablesRenderer(render_options())
        t = time.perf_counter()
        renderer.render(snap.services, snap.endpoints, full=True)
        cold = time.perf_counter() - t
        warm = _best(lambda: renderer.render(snap.services, snap.endpoints, full=True), repeats)
    return RenderTimes(cold, warm)


def compiled_module() -> ModuleType | None:
    return None if not fastpath.COMPILED else sys.modules[fastpath.IMPLEMENTATION]


# -- kernel --------------------------------------------------------------------
@contextlib.contextmanager
def scratch_netns(tag: str) -> Iterator[str]:
    """A fresh network namespace, deleted on the way out whatever happened."""
    name = f"kpbench-{os.getpid()}-{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


def bare_restore(ipt: Iptables, netns: str, backend: str, text: str) -> float:
    """``iptables-restore`` of ``text`` with the argv kproxy uses, and nothing else."""
    argv = [
        "ip", "netns", "exec", netns, f"iptables-{backend}-restore",
        *ipt.restore_wait_flags(), "--noflush", "--counters",
    ]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return elapsed


@dataclass
class KernelTimes:
    apply_s: float
    partial_render_s: float
    partial_restore_s: float
    bare_s: float
    partial_lines: int

    @property
    def partial_s(self) -> float:
        return self.partial_render_s + self.partial_restore_s


def time_kernel(
    core: ProxyCore,
    services: int,
    endpoints: int,
    backend: str,
    repeats: int,
    full_text: str,
    timeout: float,
) -> KernelTimes:
    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        # The library's 120 s command timeout is for a live proxy; here the
        # budget decides (a 5,000-Service iptables-nft restore can take longer).
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout
        )

    with scratch_netns(f"{services}-{backend}") as netns:
        ipt = Iptables("ipv4", backend, netns=netns, run=run)  # type: ignore[arg-type]
        ipt.version()  # resolved once, outside the timed restores
        t = time.perf_counter()
        ipt.restore(full_text, noflush=True, counters=True)
        apply_s = time.perf_counter() - t

        renderer = IPTablesRenderer(render_options())
        snap = core.snapshot()
        renderer.render(snap.services, snap.endpoints, full=True)  # warm caches, as a live proxy
        best_render = best_restore = best_bare = float("inf")
        lines = 0
        for k in range(repeats):
            # Alternate service 0's first endpoint between two fresh addresses.
            first = 0xFE0000 + (k % 2)
            core.on_endpoint_slice(None, endpoint_slice(0, endpoints, first=first))
            t = time.perf_counter()
            snap = core.snapshot()
            result = renderer.render(
                snap.services, snap.endpoints, snap.changed, full=False, existing_nat_chains=None
            )
            t_render = time.perf_counter() - t
            t = time.perf_counter()
            ipt.restore(result.text, noflush=True, counters=True)
            t_restore = time.perf_counter() - t
            if t_render + t_restore < best_render + best_restore:
                best_render, best_restore = t_render, t_restore
            lines = result.text.count("\n")
            best_bare = min(best_bare, bare_restore(ipt, netns, backend, result.text))
        # Leave the objects as built, for the next backend.
        core.on_endpoint_slice(None, endpoint_slice(0, endpoints))
        core.snapshot()
    return KernelTimes(apply_s, best_render, best_restore, best_bare, lines)


# -- the run -------------------------------------------------------------------
@dataclass
class Step:
    services: int
    endpoints: int
    rules: int = 0
    chains: int = 0
    full_lines: int = 0
    render_compiled_s: float | None = None
    render_compiled_cold_s: float | None = None
    render_twin_s: float | None = None
    render_twin_cold_s: float | None = None
    kernel: dict[str, KernelTimes | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def twin_over_compiled(self) -> float | None:
        if self.render_compiled_s and self.render_twin_s:
            return self.render_twin_s / self.render_compiled_s
        return None

    def render_s(self) -> float | None:
        """The render time kproxy runs with (compiled when built, else the twin)."""
        return self.render_compiled_s if self.render_compiled_s is not None else self.render_twin_s

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "services": self.services,
            "endpoints_per_service": self.endpoints,
            "rules": self.rules,
            "chains": self.chains,
            "full_lines": self.full_lines,
            "render_compiled_s": self.render_compiled_s,
            "render_compiled_cold_s": self.render_compiled_cold_s,
            "render_twin_s": self.render_twin_s,
            "render_twin_cold_s": self.render_twin_cold_s,
            "twin_over_compiled": self.twin_over_compiled,
        }
        render = self.render_s()
        for backend in BACKENDS:
            k = self.kernel.get(backend)
            vals: dict[str, float | int | None] = dict.fromkeys(
                (
                    "apply_s", "partial_s", "partial_render_s", "partial_restore_s", "bare_s",
                    "partial_lines", "render_over_apply", "partial_over_bare",
                    "partial_over_full",
                ),
            )  # fmt: skip
            if k is not None:
                vals.update(asdict(k))
                vals["partial_s"] = k.partial_s
                vals["render_over_apply"] = render / k.apply_s if render is not None else None
                vals["partial_over_bare"] = k.partial_s / k.bare_s
                vals["partial_over_full"] = k.partial_s / k.apply_s
            row.update({f"{backend}_{key}": v for key, v in vals.items()})
        row["notes"] = "; ".join(self.notes)
        return row


def count_rules(result: RenderResult) -> tuple[int, int]:
    return result.filter_rules + result.nat_rules, result.filter_chains + result.nat_chains


def run_step(
    services: int,
    endpoints: int,
    *,
    backends: Sequence[str],
    repeats: int,
    partial_repeats: int,
    kernel_ok: Callable[[str, int], str | None],
    on_kernel: Callable[[str, int, float], None],
    time_left: Callable[[], float] = lambda: 600.0,
) -> Step:
    step = Step(services, endpoints)
    core = build_core(services, endpoints)
    compiled = compiled_module()
    if compiled is not None:
        rt = time_render(core, compiled, repeats)
        step.render_compiled_s, step.render_compiled_cold_s = rt.warm_s, rt.cold_s
    else:
        step.notes.append("compiled fast path not built")
    rt = time_render(core, _fastpath_py, repeats)
    step.render_twin_s, step.render_twin_cold_s = rt.warm_s, rt.cold_s

    snap = core.snapshot()
    full = IPTablesRenderer(render_options()).render(snap.services, snap.endpoints, full=True)
    step.rules, step.chains = count_rules(full)
    step.full_lines = full.text.count("\n")
    for backend in backends:
        why_not = kernel_ok(backend, services)
        if why_not:
            step.kernel[backend] = None
            step.notes.append(f"{backend}: {why_not}")
            continue
        t = time.perf_counter()
        try:
            step.kernel[backend] = time_kernel(
                core,
                services,
                endpoints,
                backend,
                partial_repeats,
                full.text,
                max(time_left(), 1.0),
            )
        except (KProxyError, RuntimeError, subprocess.TimeoutExpired) as e:
            # Out of budget or a tool error: report it, keep the other stages.
            step.kernel[backend] = None
            step.notes.append(f"{backend}: failed after {time.perf_counter() - t:.0f} s: {e}")
            on_kernel(backend, services, float("inf"))
            continue
        on_kernel(backend, services, time.perf_counter() - t)
    return step


class Budget:
    """Skips a kernel stage whose estimated time would overrun the run's budget.

    The estimate extrapolates the backend's last two steps with their own
    growth exponent (clamped to [1, 2]): iptables-nft restores grow faster
    than linearly with the table size, so a linear guess would overrun.
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.history: dict[str, list[tuple[int, float]]] = {}  # backend -> (services, s)

    def estimate(self, backend: str, services: int) -> float:
        hist = self.history.get(backend, [])
        if not hist:
            return 0.0
        n1, t1 = hist[-1]
        k = 1.0
        if len(hist) >= 2:
            n0, t0 = hist[-2]
            if n1 > n0 and t0 > 0 and t1 > 0:
                k = min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
        return float(t1 * (services / n1) ** k)

    def check(self, backend: str, services: int) -> str | None:
        estimate = self.estimate(backend, services)
        left = self.deadline - time.monotonic()
        if estimate > left:
            return f"skipped: needs ~{estimate:.0f} s, {max(left, 0):.0f} s of budget left"
        return None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, backend: str, services: int, seconds: float) -> None:
        self.history.setdefault(backend, []).append((services, seconds))


# -- reporting -----------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("services", "svc", ""),
        ("rules", "rules", ""),
        ("render_compiled_s", "render C s", ".3f"),
        ("render_twin_s", "render py s", ".3f"),
        ("twin_over_compiled", "py/C", ".2f"),
    ]
    for b in BACKENDS:
        cols += [
            (f"{b}_apply_s", f"{b} apply s", ".3f"),
            (f"{b}_render_over_apply", "render/apply", ".3f"),
            (f"{b}_partial_s", "partial s", ".3f"),
            (f"{b}_bare_s", "bare s", ".3f"),
            (f"{b}_partial_over_bare", "part/bare", ".2f"),
            (f"{b}_partial_over_full", "part/full", ".3f"),
        ]
    head = [c[1] for c in cols]
    body = [[_fmt(r.get(k), spec) for k, _, spec in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    for r in rows:
        if r.get("notes"):
            lines.append(f"  {r['services']} services: {r['notes']}")
    return "\n".join(lines)


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The targets, as ratios at the largest step that has them."""
    out: list[str] = []
    for b in BACKENDS:
        have = [r for r in rows if r.get(f"{b}_apply_s") is not None]
        if not have:
            out.append(f"{b}: no kernel measurements")
            continue
        r = have[-1]
        ra, pb = r[f"{b}_render_over_apply"], r[f"{b}_partial_over_bare"]
        out.append(
            f"{b} @ {r['services']} services: render/apply {_fmt(ra)} (target ≤ {RENDER_TARGET})"
            f" {'met' if ra is not None and ra <= RENDER_TARGET else 'NOT met'};"
            f" partial sync/bare restore {_fmt(pb, '.2f')} (target ≤ {OVERHEAD_TARGET})"
            f" {'met' if pb <= OVERHEAD_TARGET else 'NOT met'};"
            f" partial/full {_fmt(r[f'{b}_partial_over_full'])}"
        )
    return out


def write_outputs(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "rule_churn.csv", out / "rule_churn.json"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta, "steps": list(rows)}, indent=2) + "\n")
    paths = [csv_path, json_path]
    png = plot(rows, out / "rule_churn.png")
    if png is not None:
        paths.append(png)
    return paths


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install .[bench]); no plot", file=sys.stderr)
        return None
    x = [r["services"] for r in rows]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(xi, r[key]) for xi, r in zip(x, rows, strict=True) if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for key, label, style in [
        ("render_compiled_s", "render (compiled)", "o-"),
        ("render_twin_s", "render (twin)", "o--"),
        ("legacy_apply_s", "full apply legacy", "s-"),
        ("nft_apply_s", "full apply nft", "s--"),
        ("legacy_partial_s", "partial sync legacy", "^-"),
        ("nft_partial_s", "partial sync nft", "^--"),
        ("legacy_bare_s", "bare restore of partial, legacy", "v:"),
        ("nft_bare_s", "bare restore of partial, nft", "v-."),
    ]:
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"Services (× {rows[0]['endpoints_per_service']} endpoints)")
    ax.set_ylabel("seconds")
    ax.set_title("rule churn: time per operation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for key, label, style in [
        ("legacy_render_over_apply", "render / full apply, legacy", "s-"),
        ("nft_render_over_apply", "render / full apply, nft", "s--"),
        ("legacy_partial_over_bare", "partial sync / bare restore, legacy", "^-"),
        ("nft_partial_over_bare", "partial sync / bare restore, nft", "^--"),
        ("legacy_partial_over_full", "partial / full, legacy", "v:"),
        ("nft_partial_over_full", "partial / full, nft", "v-."),
    ]:
        xs, ys = series(key)
        if xs:
            ax2.plot(xs, ys, style, label=label)
    ax2.axhline(RENDER_TARGET, color="grey", lw=0.8, ls=":")
    ax2.axhline(OVERHEAD_TARGET, color="grey", lw=0.8, ls=":")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("Services")
    ax2.set_ylabel("ratio")
    ax2.set_title(f"ratios (targets {RENDER_TARGET} and {OVERHEAD_TARGET} dotted)")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:  # no ratios without kernel measurements
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--steps",
        default=",".join(map(str, DEFAULT_STEPS)),
        help="comma-separated Service counts (default %(default)s)",
    )
    p.add_argument("--endpoints", type=int, default=10, help="endpoints per Service")
    p.add_argument("--repeats", type=int, default=3, help="renders: take the best of this many")
    p.add_argument(
        "--partial-repeats",
        type=int,
        default=5,
        help="partial sync + bare restore pairs per backend (best of; the machine may be busy)",
    )
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help="iptables backends (default %(default)s)"
    )
    p.add_argument("--no-kernel", action="store_true", help="render only (no root needed)")
    p.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument("--out", type=Path, default=OUT, help="output directory")
    return p.parse_args(argv)


def run(
    steps: Sequence[int],
    *,
    endpoints: int = 10,
    repeats: int = 3,
    partial_repeats: int = 5,
    backends: Sequence[str] = BACKENDS,
    budget: float = 900.0,
) -> list[dict[str, Any]]:
    """Measure every step; returns one row per step (see :meth:`Step.row`)."""
    b = Budget(budget)
    rows: list[dict[str, Any]] = []
    for n in steps:
        step = run_step(
            n,
            endpoints,
            backends=backends,
            repeats=repeats,
            partial_repeats=partial_repeats,
            kernel_ok=b.check,
            on_kernel=b.record,
            time_left=b.left,
        )
        rows.append(step.row())
        print(f"  {n} services done", file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    backends: list[str] = []
    if not args.no_kernel:
        if os.geteuid() != 0:
            print("not root: measuring the render only (--no-kernel)", file=sys.stderr)
        else:
            backends = [s.strip() for s in args.backends.split(",") if s.strip()]
    for backend in backends:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    started = time.monotonic()
    rows = run(
        steps, endpoints=args.endpoints, repeats=args.repeats,
        partial_repeats=args.partial_repeats, backends=backends, budget=args.budget,
    )  # fmt: skip
    meta = {
        "bench": "rule_churn",
        "implementation": fastpath.IMPLEMENTATION,
        "steps": steps,
        "endpoints_per_service": args.endpoints,
        "repeats": args.repeats,
        "partial_repeats": args.partial_repeats,
        "backends": backends,
        "seconds": round(time.monotonic() - started, 1),
        "targets": {"render_over_apply": RENDER_TARGET, "partial_over_bare": OVERHEAD_TARGET},
    }
    print(table(rows))
    for line in verdict(rows) if backends else []:
        print(line)
    for path in write_outputs(rows, meta, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
