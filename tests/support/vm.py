"""The ``vm`` test tier: run every selected ``vm``-marked test inside ONE virtme-ng VM.

This module owns the pytest plugin that makes ``@pytest.mark.vm`` work, on both
sides of the VM boundary:

* On the host (``KPROXY_IN_VM`` unset) a vm-marked item never runs its fixtures
  or its body here.  Its setup only checks the tier's prerequisites (skip
  locally, fail under ``CI=true``).  The first such item to reach its call phase
  boots Debian's generic kernel under virtme-ng (``--disable-kvm``, no network)
  once for the whole session and runs ``python -m pytest`` inside on exactly the
  selected vm-marked node ids.  Each outer item then replays its inner result:
  passed, failed (with the inner failure text), skipped, xfailed.  An item that
  has no inner result (the VM did not boot, timed out, crashed) fails.
* Inside the guest (``KPROXY_IN_VM=1``) tests run normally, and every report is
  appended as one JSON line to ``$KPROXY_VM_REPORT`` in a host directory that
  the guest mounts read-write (``--rwdir``); everything else the guest sees of
  the host is read-only, so pycache, the pytest cache and hypothesis's database
  are turned off or pointed at the guest's own /tmp.

Invariants: one boot per session at most; the VM's process group is killed on
every path out (normal exit, timeout, Ctrl-C); the guest gets no network device
(virtme-ng's default is ``-net none`` and no ``--network`` is passed); boot and
run times are shown in the terminal summary.

Knobs: ``KPROXY_VM_KERNEL`` (a /boot/vmlinuz-* path; default: the newest one
with ipvs modules), ``KPROXY_VM_TIMEOUT`` (seconds for boot + run, default 480,
below pytest-timeout's 600), ``KPROXY_VM_KEEP=1`` (keep the work directory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.tiers import require

__all__ = ["pytest_configure"]

IN_VM = os.environ.get("KPROXY_IN_VM") == "1"
_REPORT_ENV = "KPROXY_VM_REPORT"
_DEFAULT_TIMEOUT = 480.0
# Loaded before the tests so a missing module shows up in the log, not as a vague
# netlink ENOENT; schedulers other than rr are left to the kernel's autoload.
_GUEST_MODULES = ("ip_vs", "ip_vs_rr", "dummy", "veth", "ip_set", "nf_conntrack")
_PLUGIN_NAME = "kproxy-vm-tier"


# --- prerequisites --------------------------------------------------------------------


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def find_kernel(
    boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")
) -> tuple[Path, str] | None:
    """The newest ``vmlinuz-*-amd64`` whose modules include IPVS, as (image, release)."""
    override = os.environ.get("KPROXY_VM_KERNEL")
    if override:
        image = Path(override)
        release = image.name.removeprefix("vmlinuz-")
        return (image, release) if image.is_file() else None
    found = []
    for image in boot.glob("vmlinuz-*-amd64"):
        release = image.name.removeprefix("vmlinuz-")
        if (modules / release / "kernel/net/netfilter/ipvs").is_dir():
            found.append((image, release))
    return max(found, key=lambda f: _version_key(f[1]), default=None)


def _venv_bin() -> Path:
    # Not resolved: the venv's python is a symlink and its bin/ holds vng and virtme-run.
    return Path(sys.executable).parent


def _search_path() -> str:
    return os.pathsep.join([str(_venv_bin()), os.environ.get("PATH", "/usr/bin:/bin")])


def _require_prerequisites() -> tuple[Path, str]:
    require(sys.platform == "linux", "the vm tier needs Linux")
    path = _search_path()
    require(shutil.which("vng", path=path) is not None, "virtme-ng (vng) is not installed")
    require(
        shutil.which("qemu-system-x86_64", path=path) is not None,
        "qemu-system-x86_64 is missing (Debian: qemu-system-x86)",
    )
    require(
        any(shutil.which(n, path=path) for n in ("busybox-static", "busybox.static", "busybox")),
        "busybox is missing (Debian: busybox-static); virtme-ng builds its initramfs from it",
    )
    kernel = find_kernel()
    require(
        kernel is not None,
        "no /boot/vmlinuz-*-amd64 with ipvs modules (Debian: linux-image-amd64)",
    )
    assert kernel is not None
    require(os.access(kernel[0], os.R_OK), f"{kernel[0]} is not readable")
    return kernel


# --- one VM run -----------------------------------------------------------------------


@dataclass
class InnerResult:
    """What one node id did inside the VM, folded over its setup/call/teardown reports."""

    outcome: str = "passed"  # passed | failed | skipped | xfailed
    text: str = ""


@dataclass
class VmRun:
    """One boot of the guest and the inner pytest run on ``nodeids``."""

    nodeids: list[str]
    kernel: tuple[Path, str] | None = None
    results: dict[str, InnerResult] = field(default_factory=dict)
    error: str = ""
    boot_s: float | None = None
    run_s: float | None = None
    guest_uptime_s: float | None = None  # guest kernel uptime when the test script began
    returncode: int | None = None
    log_tail: str = ""


def _guest_script(work: Path, rootdir: Path, plugins: list[str]) -> str:
    q = shlex.quote
    env = {
        "KPROXY_IN_VM": "1",
        _REPORT_ENV: str(work / "report.jsonl"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/kproxy-hypothesis",
        "PATH": f"{_venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    if "CI" in os.environ:
        env["CI"] = os.environ["CI"]
    # -p must be on the command line: pytest reads plugin options before @file expansion.
    args = [sys.executable, "-m", "pytest", *plugins, f"@{work / 'args'}"]
    lines = [
        "# generated by tests/support/vm.py; runs as root inside the guest",
        f"cat /proc/uptime > {q(str(work / 'started'))}",
        *(f"export {k}={q(v)}" for k, v in env.items()),
        f"for m in {' '.join(_GUEST_MODULES)}; do",
        '  modprobe "$m" || echo "kproxy-vm: modprobe $m failed" >&2',
        "done",
        f"cd {q(str(rootdir))} || exit 97",
        shlex.join(args),
    ]
    return "\n".join(lines) + "\n"


def _inner_args(nodeids: Iterable[str], rootdir: Path, inifile: Path | None) -> list[str]:
    args = ["--color=no", "-q", "-rfEsxX", f"--rootdir={rootdir}"]
    if inifile is not None:
        args.append(f"--config-file={inifile}")
    return [*args, *nodeids]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, the VM's own process group (vng, virtme-run, qemu)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the group is empty: everything already exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip("\x00").rstrip() for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def fold_reports(lines: Iterable[str]) -> dict[str, InnerResult]:
    """Fold JSON report lines (written inside the guest) into one result per node id."""
    results: dict[str, InnerResult] = {}
    for line in lines:
        if not line.strip():
            continue
        rep = json.loads(line)
        if "nodeid" not in rep:
            continue
        res = results.setdefault(rep["nodeid"], InnerResult())
        if res.outcome == "failed":
            continue  # the first failure is the story; later phases add nothing
        when, outcome, text = rep["when"], rep["outcome"], rep["text"]
        if outcome == "failed":
            prefix = "" if when == "call" else f"[{when} failed inside the VM]\n"
            res.outcome, res.text = "failed", prefix + text
        elif outcome == "skipped":
            res.outcome = "xfailed" if rep.get("wasxfail") is not None else "skipped"
            res.text = rep.get("wasxfail") or text
    return results


def _pump(src: IO[bytes], log: IO[bytes]) -> None:
    # qemu reopens /proc/self/fd/1 with O_TRUNC and its own offset, which garbles a
    # shared log file; a pipe copied by this thread keeps every writer's output.
    fd = src.fileno()
    for chunk in iter(lambda: os.read(fd, 65536), b""):
        log.write(chunk)
        log.flush()


def _launch_and_wait(cmd: list[str], work: Path, rootdir: Path, timeout: float, run: VmRun) -> None:
    """Run ``cmd`` in its own process group, time boot and run, kill the group on any exit."""
    env = {**os.environ, "PATH": _search_path()}
    started_file = work / "started"
    with open(work / "vng.log", "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,  # CI has no stdin; vng must not wait on one
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed as one on any exit
            cwd=rootdir,
            env=env,
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        pump.start()
        started: float | None = None
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if started is None and started_file.exists():
                    started = now
                if now - start > timeout:
                    run.error = f"the VM did not finish within {timeout:.0f} s (killed)"
                    break
                time.sleep(0.2)
        finally:
            _kill_group(proc)
            pump.join(timeout=10)
            proc.stdout.close()
        end = time.monotonic()
        if started is None and started_file.exists():
            started = end
        if started is not None:
            run.boot_s, run.run_s = started - start, end - started
            with contextlib.suppress(OSError, ValueError, IndexError):
                run.guest_uptime_s = float(started_file.read_text().split()[0])
        run.returncode = proc.returncode


def guest_plugin_flags(addopts: Iterable[str]) -> list[str]:
    """``-p no:...`` for the guest: no cache (read-only tree) and, unless the ini's
    addopts use its options, no hypothesis plugin, whose summary hook imports all
    of hypothesis (about 12 s under emulation)."""
    flags = ["-p", "no:cacheprovider"]
    if not any("hypothesis" in opt for opt in addopts):
        flags += ["-p", "no:hypothesispytest"]
    return flags


def run_in_vm(
    nodeids: list[str],
    rootdir: Path,
    inifile: Path | None,
    timeout: float,
    plugins: list[str] | None = None,
) -> VmRun:
    """Boot once, run ``nodeids`` inside, and collect their results.  Never raises."""
    run = VmRun(nodeids=nodeids)
    run.kernel = find_kernel()
    if run.kernel is None:
        run.error = "no kernel image with ipvs modules found"
        return run
    work = Path(tempfile.mkdtemp(prefix="kproxy-vm-"))
    try:
        (work / "args").write_text("\n".join(_inner_args(nodeids, rootdir, inifile)) + "\n")
        (work / "guest.sh").write_text(
            _guest_script(work, rootdir, plugins or guest_plugin_flags([]))
        )
        cmd = [
            str(shutil.which("vng", path=_search_path()) or "vng"),
            "--run", str(run.kernel[0]),
            "--disable-kvm",  # KVM is not usable on the project machines
            "--memory", "1G",
            "--rwdir", str(work),  # the only host path the guest may write
            "--cwd", str(rootdir),
            "--exec", f"sh {shlex.quote(str(work / 'guest.sh'))}",
        ]  # fmt: skip
        _launch_and_wait(cmd, work, rootdir, timeout, run)
        report = work / "report.jsonl"
        lines = report.read_text(errors="replace").splitlines() if report.exists() else []
        run.results = fold_reports(lines)
        if not run.error:
            if run.boot_s is None:
                run.error = "the guest never started the test run (boot failure?)"
            elif not any(json.loads(line).get("event") == "finish" for line in lines if line):
                run.error = f"the inner pytest did not finish (guest exit {run.returncode})"
    except OSError as e:
        run.error = f"could not run the VM: {e}"
    finally:
        run.log_tail = _tail(work / "vng.log")
        if os.environ.get("KPROXY_VM_KEEP") == "1":
            run.log_tail += f"\n(work directory kept: {work})"
        else:
            shutil.rmtree(work, ignore_errors=True)
    return run


# --- the pytest plugin ----------------------------------------------------------------


def _is_vm(item: pytest.Item) -> bool:
    return item.get_closest_marker("vm") is not None


def _outside_setup(item: pytest.Item) -> None:
    # Replaces Function.setup on the host: no fixture of a vm test may run here
    # (they program a kernel that only the guest has), only the prerequisites.
    _require_prerequisites()


def _report_text(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # a skip: (path, lineno, reason)
        return str(report.longrepr[2])
    parts = [report.longreprtext]
    parts += [f"----- {name} -----\n{body}" for name, body in report.sections if body]
    return "\n".join(p for p in parts if p)


def _headline(text: str) -> str:
    """The first ``E   ...`` line of a failure, for pytest's one-line summary."""
    m = re.search(r"^E\s+(.+)$", text, re.MULTILINE)
    return m.group(1) if m else "failed"


class VmTier:
    """Host side: defer vm items to one VM run.  Guest side: write the JSON report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.run: VmRun | None = None
        self.report_path = os.environ.get(_REPORT_ENV) if IN_VM else None

    # host side

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        if IN_VM:
            return
        for item in items:
            if _is_vm(item) and isinstance(item, pytest.Function):
                item.setup = functools.partial(_outside_setup, item)  # type: ignore[method-assign]

    def _vm_run(self, session: pytest.Session) -> VmRun:
        if self.run is None:
            nodeids = [i.nodeid for i in session.items if _is_vm(i)]
            timeout = float(os.environ.get("KPROXY_VM_TIMEOUT", _DEFAULT_TIMEOUT))
            plugins = guest_plugin_flags(self.config.getini("addopts"))
            cfg = self.config
            # Recorded first: if the run is interrupted (pytest-timeout, Ctrl-C), the other
            # vm items fail with this error instead of booting again.
            self.run = VmRun(nodeids=nodeids, error="the VM run was interrupted")
            self.run = run_in_vm(nodeids, cfg.rootpath, cfg.inipath, timeout, plugins)
        return self.run

    @pytest.hookimpl(tryfirst=True)
    def pytest_pyfunc_call(self, pyfuncitem: pytest.Function) -> bool | None:
        if IN_VM or not _is_vm(pyfuncitem):
            return None
        run = self._vm_run(pyfuncitem.session)
        result = run.results.get(pyfuncitem.nodeid)
        if result is None:
            why = run.error or f"no result inside the VM (guest exit code {run.returncode})"
            pytest.fail(f"vm tier: {why}\n--- VM log (tail) ---\n{run.log_tail}", pytrace=False)
        if result.outcome == "failed":
            pytest.fail(f"inside the VM: {_headline(result.text)}\n{result.text}", pytrace=False)
        if result.outcome == "skipped":
            pytest.skip(f"inside the VM: {result.text}")
        if result.outcome == "xfailed":
            pytest.xfail(result.text)
        return True

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        run = self.run
        if run is None:
            return
        counts: dict[str, int] = {}
        for res in run.results.values():
            counts[res.outcome] = counts.get(res.outcome, 0) + 1
        tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"

        def secs(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f} s"

        tr = terminalreporter
        tr.write_sep("-", "vm tier")
        kernel = run.kernel[0] if run.kernel else "none"
        tr.write_line(f"kernel {kernel}; {len(run.nodeids)} test(s) sent into one VM")
        tr.write_line(
            f"boot {secs(run.boot_s)} (guest kernel up {secs(run.guest_uptime_s)}), "
            f"run {secs(run.run_s)}; inside: {tally}"
        )
        if run.error:
            tr.write_line(f"error: {run.error}")

    # guest side

    def _write(self, record: dict[str, Any]) -> None:
        if self.report_path:
            with open(self.report_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.report_path:
            return
        self._write(
            {
                "nodeid": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "wasxfail": getattr(report, "wasxfail", None),
                "duration": report.duration,
                "text": _report_text(report) if not report.passed else "",
            }
        )

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self._write({"event": "finish", "exitstatus": int(exitstatus)})


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(VmTier(config), _PLUGIN_NAME)
