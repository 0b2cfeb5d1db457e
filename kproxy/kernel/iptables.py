"""iptables verbs: restore/save tables and ensure single chains and rules.

This module owns every call to the ``iptables*``, ``iptables*-restore`` and
``iptables*-save`` binaries (IPv4 and IPv6, legacy and nft backends), the
choice between the backends, and the error that keeps a failed restore input.

Invariants:

- Callers speak verbs (restore these tables, ensure this rule), never argv; the
  argv, lock-wait flags and backend binary names are decided here only.
- :class:`IptablesBackend` is the contract; :class:`Iptables` (real) and
  :class:`kproxy.kernel.fakes.iptables.FakeIptables` implement it, and one
  contract suite holds both to the real tools' behaviour.
- A failed restore raises :class:`RestoreError` carrying the line number the tool
  reported, the input lines around it and stderr. ``iptables-restore`` commits
  table by table: tables whose ``COMMIT`` preceded the failing line are applied,
  the failing table is left exactly as it was.
- With ``netns`` set, every command runs under ``ip netns exec NAME`` (tests);
  the proxy itself passes ``None`` and runs in its own namespace.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, Protocol, runtime_checkable

from kproxy.errors import KProxyError

Family = Literal["ipv4", "ipv6"]
BackendName = Literal["legacy", "nft"]
BackendChoice = Literal["legacy", "nft", "auto"]
Version = tuple[int, int, int]

TABLES: Final = ("filter", "nat", "mangle", "raw", "security")

# Version gates as in upstream pkg/util/iptables: the iptables command takes -w from
# 1.4.20 (-w SECONDS from 1.4.22, -W USECS from 1.6.1); iptables-restore takes -w only
# from 1.6.2, which is also where MASQUERADE --random-fully appeared.
WAIT_MIN_VERSION: Final[Version] = (1, 4, 20)
WAIT_SECONDS_MIN_VERSION: Final[Version] = (1, 4, 22)
WAIT_INTERVAL_MIN_VERSION: Final[Version] = (1, 6, 1)
RESTORE_WAIT_MIN_VERSION: Final[Version] = (1, 6, 2)
RANDOM_FULLY_MIN_VERSION: Final[Version] = (1, 6, 2)
# iptables 1.8.9 ignores -W and prints a deprecation warning on stderr.
WAIT_INTERVAL_DEPRECATED_VERSION: Final[Version] = (1, 8, 9)
WAIT_SECONDS: Final = "5"
WAIT_INTERVAL_USECONDS: Final = "100000"

# kubelet (1.17+) creates one of these in the mangle table of the backend it uses.
KUBELET_HINT_CHAINS: Final = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_HINT_RE: Final = re.compile(rf"^:({'|'.join(KUBELET_HINT_CHAINS)})\b", re.M)
_RULE_LINE_RE: Final = re.compile(r"^-", re.M)
_VERSION_RE: Final = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
# Formats seen from 1.8.9: "Error occurred at line: N" (both backends, parse errors),
# "iptables-restore: line N failed", "COMMIT expected at line N",
# "line N: CHAIN_DEL failed (...)" (nft), "line N table name 'x' invalid" (nft).
_ERROR_AT_RE: Final = re.compile(r"Error occurred at line: (\d+)")
_ANY_LINE_RE: Final = re.compile(r"\bline:? (\d+)")
CONTEXT_RADIUS: Final = 3
COMMAND_TIMEOUT_S: Final = 120.0


class RulePosition(Enum):
    """Where :meth:`IptablesBackend.ensure_rule` puts a missing rule."""

    PREPEND = "-I"
    APPEND = "-A"


class IptablesError(KProxyError):
    """An iptables command failed; keeps argv, exit status and stderr."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        detail = self.stderr.strip()
        return f"{self.message}: {detail}" if detail else self.message


class RestoreError(IptablesError):
    """``iptables-restore`` rejected its input.

    ``line`` is the 1-based input line the tool blamed (``None`` when it named
    none), ``context`` the numbered input lines around it and ``text`` the whole
    input, so the log shows the offending rule rather than only the tool's terse
    message. ``reason`` is the tool's complaint on one line.
    """

    def __init__(
        self,
        reason: str,
        *,
        text: str,
        line: int | None,
        stderr: str = "",
        argv: Sequence[str] = (),
        returncode: int | None = None,
    ) -> None:
        where = f" at line {line}" if line is not None else ""
        super().__init__(
            f"iptables-restore failed{where}: {reason}",
            argv=argv,
            returncode=returncode,
            stderr=stderr,
        )
        self.reason = reason
        self.text = text
        self.line = line
        self.context = context_lines(text, line)

    def __str__(self) -> str:
        shown = "\n".join(f"{'>' if n == self.line else ' '} {n:5d}  {s}" for n, s in self.context)
        return f"{self.message}\n{shown}" if shown else self.message


def context_lines(
    text: str, line: int | None, radius: int = CONTEXT_RADIUS
) -> tuple[tuple[int, str], ...]:
    """The numbered lines of ``text`` within ``radius`` of ``line``."""
    if line is None:
        return ()
    lines = text.splitlines()
    lo, hi = max(1, line - radius), min(len(lines), line + radius)
    return tuple((n, lines[n - 1]) for n in range(lo, hi + 1))


def parse_error_line(stderr: str) -> int | None:
    """The input line number an ``iptables-restore`` of either backend blamed."""
    m = _ERROR_AT_RE.search(stderr) or _ANY_LINE_RE.search(stderr)
    return int(m.group(1)) if m else None


def restore_reason(stderr: str) -> str:
    """The tool's complaint in one line, without its usage hint and line marker."""
    parts = [
        s.strip().rstrip(":")
        for s in stderr.splitlines()
        if s.strip() and not s.startswith("Try `") and not _ERROR_AT_RE.match(s)
    ]
    return " ".join(p for p in parts if p) or "failed"


def parse_version(text: str) -> Version:
    """``(1, 8, 9)`` from ``iptables v1.8.9 (nf_tables)``."""
    m = _VERSION_RE.search(text)
    if m is None:
        raise IptablesError(f"cannot parse an iptables version from {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def select_tables(text: str, tables: Collection[str] | None) -> str:
    """Blank out the sections of ``text`` for tables not in ``tables``.

    Skipped lines become ``#`` comments rather than disappearing so that line
    numbers in the tool's errors still point into the caller's text.
    """
    if tables is None:
        return text
    out: list[str] = []
    keep = True
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("*"):
            keep = s[1:] in tables
        out.append(raw if keep else "#")
        if s == "COMMIT":
            keep = True
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _mangle_sections(save: str) -> str:
    out: list[str] = []
    inside = False
    for line in save.splitlines():
        if line.startswith("*"):
            inside = line.strip() == "*mangle"
        if inside:
            out.append(line)
    return "\n".join(out)


def choose_backend(legacy_save: str, nft_save: str) -> BackendName:
    """Pick the backend the node uses, as kubernetes-sigs/iptables-wrappers does.

    Inputs are the concatenated IPv4+IPv6 ``*-save`` outputs of each backend.
    Order: kubelet's hint chain in nft's mangle table → nft; else a hint chain
    anywhere in legacy's save → legacy; else legacy only if it holds strictly more
    rules (``^-`` lines) than nft, since nft is the default on current distros.
    """
    if _HINT_RE.search(_mangle_sections(nft_save)):
        return "nft"
    if _HINT_RE.search(legacy_save):
        return "legacy"
    if len(_RULE_LINE_RE.findall(legacy_save)) > len(_RULE_LINE_RE.findall(nft_save)):
        return "legacy"
    return "nft"


@runtime_checkable
class IptablesBackend(Protocol):
    """The iptables verbs the proxy modes depend on (real or fake)."""

    @property
    def family(self) -> Family: ...

    def restore(
        self,
        text: str,
        *,
        tables: Collection[str] | None = None,
        noflush: bool = True,
        counters: bool = True,
    ) -> None: ...

    def save(self, table: str | None = None, *, counters: bool = False) -> str: ...

    def ensure_chain(self, table: str, chain: str) -> bool: ...

    def ensure_rule(
        self, position: RulePosition, table: str, chain: str, args: Sequence[str]
    ) -> bool: ...

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> None: ...

    def flush_chain(self, table: str, chain: str) -> None: ...

    def delete_chain(self, table: str, chain: str) -> None: ...

    def chain_exists(self, table: str, chain: str) -> bool: ...

    def has_random_fully(self) -> bool: ...

    def version(self) -> Version: ...


Runner = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, capturing text output (the default runner)."""
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IptablesError(f"cannot run {argv[0]}: {e}", argv=argv) from e


@dataclass(frozen=True, slots=True)
class _Tools:
    cmd: str
    restore: str
    save: str


def _tools(family: Family, backend: BackendName) -> _Tools:
    base = "iptables" if family == "ipv4" else "ip6tables"
    return _Tools(f"{base}-{backend}", f"{base}-{backend}-restore", f"{base}-{backend}-save")


def detect_backend(netns: str | None = None, run: Runner = run_command) -> BackendName:
    """Read both backends' rules (both families) and apply :func:`choose_backend`."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    saves: dict[BackendName, str] = {}
    for backend in ("legacy", "nft"):
        out: list[str] = []
        for family in ("ipv4", "ipv6"):
            # A missing or failing tool counts as "no rules", as in the wrapper script.
            try:
                proc = run([*prefix, _tools(family, backend).save], None)
            except IptablesError:
                continue
            if proc.returncode == 0:
                out.append(proc.stdout)
        saves[backend] = "\n".join(out)
    return choose_backend(saves["legacy"], saves["nft"])


class Iptables:
    """The real iptables verbs for one family and backend, optionally in a netns."""

    def __init__(
        self,
        family: Family = "ipv4",
        backend: BackendChoice = "auto",
        netns: str | None = None,
        run: Runner = run_command,
    ) -> None:
        self._family: Family = family
        self._netns = netns
        self._run = run
        self._backend: BackendName | None = None if backend == "auto" else backend
        self._version: Version | None = None

    @property
    def family(self) -> Family:
        return self._family

    @property
    def backend(self) -> BackendName:
        """The resolved backend (``auto`` is detected once, on first use)."""
        if self._backend is None:
            self._backend = detect_backend(self._netns, self._run)
        return self._backend

    def _tools(self) -> _Tools:
        return _tools(self._family, self.backend)

    def _exec(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self._netns] if self._netns else []
        return self._run([*prefix, *argv], stdin)

    def version(self) -> Version:
        if self._version is None:
            # --version needs no namespace and touches no table.
            proc = self._run([self._tools().cmd, "--version"], None)
            if proc.returncode != 0:
                raise IptablesError(
                    "iptables --version failed",
                    argv=[self._tools().cmd],
                    returncode=proc.returncode,
                    stderr=proc.stderr,
                )
            self._version = parse_version(proc.stdout + proc.stderr)
        return self._version

    def has_random_fully(self) -> bool:
        return self.version() >= RANDOM_FULLY_MIN_VERSION

    def _interval_flags(self) -> list[str]:
        v = self.version()
        if WAIT_INTERVAL_MIN_VERSION <= v < WAIT_INTERVAL_DEPRECATED_VERSION:
            return ["-W", WAIT_INTERVAL_USECONDS]
        return []

    def wait_flags(self) -> list[str]:
        """xtables-lock wait flags for the ``iptables`` command, as upstream picks them."""
        v = self.version()
        if v >= WAIT_SECONDS_MIN_VERSION:
            return ["-w", WAIT_SECONDS, *self._interval_flags()]
        return ["-w"] if v >= WAIT_MIN_VERSION else []

    def restore_wait_flags(self) -> list[str]:
        """Wait flags for ``iptables-restore`` (which learnt ``-w`` only in 1.6.2)."""
        if self.version() >= RESTORE_WAIT_MIN_VERSION:
            return ["-w", WAIT_SECONDS, *self._interval_flags()]
        return []

    def restore(
        self,
        text: str,
        *,
        tables: Collection[str] | None = None,
        noflush: bool = True,
        counters: bool = True,
    ) -> None:
        argv = [self._tools().restore, *self.restore_wait_flags()]
        if noflush:
            argv.append("--noflush")
        if counters:
            argv.append("--counters")
        data = select_tables(text, tables)
        proc = self._exec(argv, data)
        if proc.returncode != 0:
            stderr = proc.stderr
            reason = restore_reason(stderr)
            raise RestoreError(
                reason,
                text=text,
                line=parse_error_line(stderr),
                stderr=stderr,
                argv=argv,
                returncode=proc.returncode,
            )

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        argv = [self._tools().save]
        if table is not None:
            argv += ["-t", table]
        if counters:
            argv.append("-c")
        proc = self._exec(argv)
        if proc.returncode != 0:
            raise IptablesError(
                "iptables-save failed", argv=argv, returncode=proc.returncode, stderr=proc.stderr
            )
        return proc.stdout

    def _iptables(self, table: str, *args: str, ok: Collection[int] = (0,)) -> int:
        """Run one ``iptables`` command; an exit status outside ``ok`` raises."""
        argv = [self._tools().cmd, *self.wait_flags(), "-t", table, *args]
        proc = self._exec(argv)
        if proc.returncode not in ok:
            raise IptablesError(
                f"{' '.join(argv)} failed",
                argv=argv,
                returncode=proc.returncode,
                stderr=proc.stderr,
            )
        return proc.returncode

    def _check(self, table: str, chain: str, args: Sequence[str]) -> bool:
        # Exit status 1 means "no such rule" (or chain); anything else is a real failure.
        return self._iptables(table, "-C", chain, *args, ok=(0, 1)) == 0

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._iptables(table, "-n", "-L", chain, ok=(0, 1)) == 0

    def ensure_chain(self, table: str, chain: str) -> bool:
        # -N fails with status 1 when the chain exists (or on other errors: recheck).
        if self._iptables(table, "-N", chain, ok=(0, 1)) == 0:
            return False
        if self.chain_exists(table, chain):
            return True
        raise IptablesError(f"cannot create chain {chain} in table {table}")

    def ensure_rule(
        self, position: RulePosition, table: str, chain: str, args: Sequence[str]
    ) -> bool:
        if self._check(table, chain, args):
            return True
        self._iptables(table, position.value, chain, *args)
        return False

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> None:
        if self._check(table, chain, args):
            self._iptables(table, "-D", chain, *args)

    def flush_chain(self, table: str, chain: str) -> None:
        self._iptables(table, "-F", chain)

    def delete_chain(self, table: str, chain: str) -> None:
        self._iptables(table, "-X", chain)
