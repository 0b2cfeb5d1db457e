"""A stateful fake of the iptables verbs, held to the real tools by a contract suite.

Owns an in-memory model of the tables of one family: chains (built-in with a
policy and counters, user-defined with ``-``), ordered rules with counters, and
the jump references between them. ``restore`` interprets ``iptables-restore``
input with the real tool's semantics (see tests/kernel/test_iptables_contract.py):

- each ``*table`` ... ``COMMIT`` section is applied atomically at its ``COMMIT``;
  earlier sections stay applied when a later one fails;
- with ``noflush`` a chain line flushes that user chain (built-in chains are only
  given their policy); without it the whole table is emptied first (user chains
  deleted, built-in chains flushed, policies kept);
- what the real tool rejects is rejected with a :class:`RestoreError` naming the
  line, as legacy iptables-restore does: a jump to a missing chain, a rule or
  ``-X`` for a missing chain, deleting a chain that is referenced or not empty, a
  bad table name, a policy on a user chain, a missing ``COMMIT``.

Deliberately not modelled: per-table/per-hook target restrictions (e.g.
MASQUERADE outside nat), match extension option validation, ``-R``/``-Z``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final

from kproxy.kernel.fakes.iptables_rules import (
    EXTENSION_TARGETS,
    STANDARD_TARGETS,
    RuleSpec,
    RuleSyntaxError,
    parse_counters,
    parse_rule,
    tokenize,
    valid_chain_name,
)
from kproxy.kernel.iptables import (
    Family,
    IptablesError,
    RestoreError,
    RulePosition,
    Version,
    select_tables,
)

__all__ = ["BUILTIN_CHAINS", "FakeIptables"]

BUILTIN_CHAINS: Final[dict[str, tuple[str, ...]]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
_POLICIES: Final = frozenset({"ACCEPT", "DROP"})


class _Failure(Exception):
    """One command failed; becomes a RestoreError or IptablesError at the edge."""


@dataclass(slots=True)
class _Rule:
    spec: RuleSpec
    packets: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _Chain:
    name: str
    builtin: bool
    policy: str = "-"
    packets: int = 0
    bytes: int = 0
    rules: list[_Rule] = field(default_factory=list)


@dataclass(slots=True)
class _Table:
    name: str
    chains: dict[str, _Chain]

    @classmethod
    def empty(cls, name: str) -> _Table:
        return cls(name, {c: _Chain(c, True, "ACCEPT") for c in BUILTIN_CHAINS[name]})

    def chain(self, name: str) -> _Chain:
        c = self.chains.get(name)
        if c is None:
            raise _Failure(f"No chain/target/match by that name: {name}")
        return c

    def references(self, name: str) -> int:
        return sum(r.spec.target == name for c in self.chains.values() for r in c.rules)

    def clone(self) -> _Table:
        """A working copy for one transaction (rule specs are immutable: shared)."""
        return _Table(self.name, {
            n: _Chain(c.name, c.builtin, c.policy, c.packets, c.bytes,
                      [_Rule(r.spec, r.packets, r.bytes) for r in c.rules])
            for n, c in self.chains.items()
        })  # fmt: skip

    def reset(self) -> None:
        """What a restore without --noflush does first: flush all, delete user chains."""
        self.chains = {n: c for n, c in self.chains.items() if c.builtin}
        for c in self.chains.values():
            c.rules.clear()


class FakeIptables:
    """In-memory iptables of one family implementing :class:`IptablesBackend`."""

    def __init__(self, family: Family = "ipv4", version: Version = (1, 8, 9)) -> None:
        self._family: Family = family
        self._version = version
        self._tables: dict[str, _Table] = {}
        self.restores: list[str] = []  # every restore input, for tests to inspect
        # Fault injection: the next ``fail_restores`` restores are refused (nothing
        # applied) with the RestoreError the real tool's failure raises.
        self.fail_restores = 0

    @property
    def family(self) -> Family:
        return self._family

    def version(self) -> Version:
        return self._version

    def has_random_fully(self) -> bool:
        return self._version >= (1, 6, 2)

    # -- restore / save ---------------------------------------------------------------

    def restore(
        self,
        text: str,
        *,
        tables: Collection[str] | None = None,
        noflush: bool = True,
        counters: bool = True,
    ) -> None:
        self.restores.append(text)
        if self.fail_restores > 0:
            self.fail_restores -= 1
            raise RestoreError("injected failure", text=text, line=1, stderr="injected")
        lines = select_tables(text, tables).splitlines()
        work: _Table | None = None
        lineno = 0
        try:
            for raw in lines:
                lineno += 1
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if work is None:
                    if not line.startswith("*"):
                        raise _Failure("expected a *table line")
                    work = self._begin(line[1:].strip(), noflush)
                elif line == "COMMIT":
                    self._tables[work.name] = work
                    work = None
                elif line.startswith("*"):
                    raise _Failure(f"Bad argument `{line}'")
                elif line.startswith(":"):
                    self._chain_line(work, line, noflush, counters)
                else:
                    self._command_line(work, line, counters)
        except (_Failure, RuleSyntaxError) as e:
            raise self._error(text, lineno, str(e)) from None
        if work is not None:
            raise self._error(text, len(lines) + 1, "COMMIT expected")

    def _error(self, text: str, line: int, reason: str) -> RestoreError:
        stderr = f"iptables-restore (fake): {reason}\nError occurred at line: {line}\n"
        return RestoreError(reason, text=text, line=line, stderr=stderr, returncode=1)

    def _begin(self, name: str, noflush: bool) -> _Table:
        if name not in BUILTIN_CHAINS:
            raise _Failure(f"table name '{name}' invalid")
        work = (self._tables.get(name) or _Table.empty(name)).clone()
        if not noflush:
            work.reset()
        return work

    def _chain_line(self, work: _Table, line: str, noflush: bool, counters: bool) -> None:
        parts = line[1:].split()
        if len(parts) < 2 or len(parts) > 3:
            raise _Failure(f"bad chain line `{line}'")
        name, policy = parts[0], parts[1]
        cnt = parse_counters(parts[2]) if len(parts) == 3 else (0, 0)
        chain = work.chains.get(name)
        if chain is not None and chain.builtin:
            if policy != "-":
                if policy not in _POLICIES:
                    raise _Failure(f"Can't set policy `{policy}' on `{name}'")
                chain.policy = policy
            if counters:
                chain.packets, chain.bytes = cnt
            return
        if policy != "-":
            raise _Failure(f"Can't set policy `{policy}' on `{name}': Bad built-in chain name")
        if not valid_chain_name(name):
            raise _Failure(f"Invalid chain name `{name}' (28 chars max)")
        if chain is None:
            work.chains[name] = _Chain(name, False)
        elif noflush:
            chain.rules.clear()
        else:
            raise _Failure(f"error creating chain '{name}':File exists")

    def _command_line(self, work: _Table, line: str, counters: bool) -> None:
        cnt: tuple[int, int] | None = None
        if line.startswith("["):
            head, _, line = line.partition("]")
            cnt = parse_counters(head + "]") if counters else None
        try:
            words = tokenize(line)
        except RuleSyntaxError as e:
            raise _Failure(str(e)) from None
        _apply(work, words, self._family, cnt)

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        if table is not None:
            if table not in BUILTIN_CHAINS:
                raise IptablesError(f"iptables-save: table '{table}' does not exist")
            # Like iptables-legacy-save -t, asking for a table instantiates it.
            names = [table]
            self._tables.setdefault(table, _Table.empty(table))
        else:
            names = [n for n in BUILTIN_CHAINS if n in self._tables]
        out: list[str] = []
        for name in names:
            out.append("# Generated by kproxy FakeIptables")
            out.extend(_render(self._tables[name], counters))
            out.append("# Completed")
        return "".join(f"{line}\n" for line in out)

    # -- single commands --------------------------------------------------------------

    def _command(self, table: str, words: list[str]) -> None:
        if table not in BUILTIN_CHAINS:
            raise IptablesError(f"can't initialize iptables table `{table}'")
        work = (self._tables.get(table) or _Table.empty(table)).clone()
        try:
            _apply(work, words, self._family, None)
        except _Failure as e:
            raise IptablesError(
                f"iptables -t {table} {' '.join(words)}: {e}", argv=words, returncode=1
            ) from None
        self._tables[table] = work

    def chain_exists(self, table: str, chain: str) -> bool:
        t = self._tables.get(table)
        return t is not None and chain in t.chains

    def ensure_chain(self, table: str, chain: str) -> bool:
        if self.chain_exists(table, chain):
            return True
        self._command(table, ["-N", chain])
        return False

    def _has_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        t = self._tables.get(table)
        if t is None or chain not in t.chains:
            return False
        try:
            spec = parse_rule(list(args), self._family)
        except RuleSyntaxError as e:
            raise IptablesError(f"bad rule {' '.join(args)}: {e}", argv=args) from None
        return any(r.spec.text == spec.text for r in t.chains[chain].rules)

    def ensure_rule(
        self, position: RulePosition, table: str, chain: str, args: Sequence[str]
    ) -> bool:
        if self._has_rule(table, chain, args):
            return True
        self._command(table, [position.value, chain, *args])
        return False

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> None:
        if self._has_rule(table, chain, args):
            self._command(table, ["-D", chain, *args])

    def flush_chain(self, table: str, chain: str) -> None:
        self._command(table, ["-F", chain])

    def delete_chain(self, table: str, chain: str) -> None:
        self._command(table, ["-X", chain])


def _render(table: _Table, counters: bool) -> list[str]:
    builtins = [c for c in table.chains.values() if c.builtin]
    users = sorted((c for c in table.chains.values() if not c.builtin), key=lambda c: c.name)
    out = [f"*{table.name}"]
    out += [f":{c.name} {c.policy} [{c.packets}:{c.bytes}]" for c in builtins + users]
    for c in builtins + users:
        for r in c.rules:
            prefix = f"[{r.packets}:{r.bytes}] " if counters else ""
            out.append(f"{prefix}-A {c.name} {r.spec.text}".rstrip())
    out.append("COMMIT")
    return out


def _parse(words: list[str], family: Family) -> RuleSpec:
    try:
        return parse_rule(words, family)
    except RuleSyntaxError as e:
        raise _Failure(str(e)) from None


def _check_target(table: _Table, spec: RuleSpec, family: Family) -> None:
    t = spec.target
    if t is None or (not spec.goto and (t in STANDARD_TARGETS or t in EXTENSION_TARGETS[family])):
        return
    c = table.chains.get(t)
    if c is None or c.builtin:
        raise _Failure(f"Couldn't load target `{t}':No such file or directory")


def _delete_chain(table: _Table, name: str) -> None:
    c = table.chain(name)
    if c.builtin:
        raise _Failure(f"Can't delete built-in chain {name}")
    if table.references(name):
        raise _Failure(f"Too many links: chain {name} is referenced")
    if c.rules:
        raise _Failure(f"Directory not empty: chain {name}")
    del table.chains[name]


def _apply(table: _Table, words: list[str], family: Family, cnt: tuple[int, int] | None) -> None:
    """Apply one iptables command (as in a restore line) to ``table`` in place."""
    if not words:
        return
    cmd, args = words[0], words[1:]
    chain_name = args[0] if args else None
    if cmd in ("-A", "--append", "-I", "--insert"):
        if chain_name is None:
            raise _Failure(f"option {cmd} requires a chain")
        chain = table.chain(chain_name)
        rest = args[1:]
        index = len(chain.rules)
        if cmd in ("-I", "--insert"):
            index = 0
            if rest and rest[0].isdigit():
                index = int(rest[0]) - 1
                rest = rest[1:]
                if not 0 <= index <= len(chain.rules):
                    raise _Failure("Index of insertion too big.")
        spec = _parse(rest, family)
        _check_target(table, spec, family)
        packets, nbytes = cnt or spec.counters or (0, 0)
        chain.rules.insert(index, _Rule(spec, packets, nbytes))
    elif cmd in ("-D", "--delete"):
        if chain_name is None:
            raise _Failure("option -D requires a chain")
        chain = table.chain(chain_name)
        rest = args[1:]
        if len(rest) == 1 and rest[0].isdigit():
            pos = int(rest[0]) - 1
            if not 0 <= pos < len(chain.rules):
                raise _Failure("Index of deletion too big.")
            del chain.rules[pos]
            return
        text = _parse(rest, family).text
        for i, r in enumerate(chain.rules):
            if r.spec.text == text:
                del chain.rules[i]
                return
        raise _Failure("Bad rule (does a matching rule exist in that chain?).")
    elif cmd in ("-N", "--new-chain"):
        if chain_name is None or not valid_chain_name(chain_name) or len(args) != 1:
            raise _Failure(f"Invalid chain name `{chain_name}'")
        if chain_name in table.chains:
            raise _Failure("Chain already exists.")
        table.chains[chain_name] = _Chain(chain_name, False)
    elif cmd in ("-X", "--delete-chain"):
        names = (
            [chain_name] if chain_name else [c.name for c in table.chains.values() if not c.builtin]
        )
        for name in names:
            _delete_chain(table, name)
    elif cmd in ("-F", "--flush"):
        for c in [table.chain(chain_name)] if chain_name else table.chains.values():
            c.rules.clear()
    elif cmd in ("-P", "--policy"):
        if len(args) != 2:
            raise _Failure("-P needs a chain and a policy")
        chain = table.chain(args[0])
        if not chain.builtin or args[1] not in _POLICIES:
            raise _Failure(f"Can't set policy `{args[1]}' on `{args[0]}'")
        chain.policy = args[1]
    else:
        raise _Failure(f"Bad argument `{cmd}' (or not supported by the fake)")
