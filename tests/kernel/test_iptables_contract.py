"""One contract for the iptables verbs: the fake and real legacy/nft in a netns.

Every ``test_contract_*`` case runs three times: against
:class:`~kproxy.kernel.fakes.iptables.FakeIptables`, and against the real
``iptables-legacy*`` and ``iptables-nft*`` tools inside a fresh network namespace
(tier netns). The fake is only allowed to be as strict as both real backends.
The plain unit tests at the end cover the pure parts (backend choice, error
parsing, flags).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence

import pytest

from kproxy.errors import KProxyError
from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.kernel.iptables import (
    BackendChoice,
    Family,
    Iptables,
    IptablesBackend,
    IptablesError,
    RestoreError,
    RulePosition,
    choose_backend,
    detect_backend,
    parse_error_line,
    parse_version,
    select_tables,
)
from tests.support.netns import NetnsFactory

Make = Callable[[Family], IptablesBackend]

# -- the three implementations -----------------------------------------------------


@pytest.fixture(
    params=[
        "fake",
        pytest.param("legacy", marks=pytest.mark.netns),
        pytest.param("nft", marks=pytest.mark.netns),
    ]
)
def make(request: pytest.FixtureRequest) -> Make:
    """``make(family)``: the implementation under test, one per family, shared state."""
    kind: str = request.param
    backend: BackendChoice = "legacy" if kind == "legacy" else "nft"
    made: dict[Family, IptablesBackend] = {}
    if kind == "fake":

        def build(family: Family) -> IptablesBackend:
            return made.setdefault(family, FakeIptables(family))

        return build
    from tests.support.tiers import require_commands

    factory: NetnsFactory = request.getfixturevalue("netns")
    require_commands(f"iptables-{kind}-restore", f"ip6tables-{kind}-restore")
    ns = factory()

    def build_real(family: Family) -> IptablesBackend:
        return made.setdefault(family, Iptables(family, backend, netns=ns.name))

    return build_real


@pytest.fixture
def ipt(make: Make) -> IptablesBackend:
    return make("ipv4")


# -- normalisation -------------------------------------------------------------------

_COUNTERS = re.compile(r"^\[\d+:\d+\] ")


def tables_of(save: str, *, counters: bool = False) -> dict[str, tuple[list[str], list[str]]]:
    """``{table: (chain lines, rules)}``; drops comments, and counters unless asked."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    current: tuple[list[str], list[str]] | None = None
    for raw in save.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = out.setdefault(line[1:], ([], []))
        elif current is None:
            raise AssertionError(f"line outside a table: {line!r}")
        elif line.startswith(":"):
            current[0].append(line if counters else line.rsplit(" ", 1)[0])
        else:
            current[1].append(line if counters else _COUNTERS.sub("", line))
    return out


def chains(ipt: IptablesBackend, table: str = "filter") -> list[str]:
    return tables_of(ipt.save(table))[table][0]


def rules(ipt: IptablesBackend, table: str = "filter") -> list[str]:
    return tables_of(ipt.save(table))[table][1]


def restore(ipt: IptablesBackend, *lines: str, noflush: bool = True, counters: bool = True) -> None:
    ipt.restore("".join(f"{line}\n" for line in lines), noflush=noflush, counters=counters)


BASE = (
    "*filter",
    ":A - [0:0]",
    ":B - [0:0]",
    "-A A -j ACCEPT",
    "-A B -j A",
    "COMMIT",
)
BUILTIN_FILTER = [":INPUT ACCEPT", ":FORWARD ACCEPT", ":OUTPUT ACCEPT"]


# -- restore semantics ---------------------------------------------------------------


def test_contract_noflush_keeps_other_chains(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE)
    restore(ipt, "*filter", ":C - [0:0]", "-A C -j RETURN", "COMMIT")
    assert chains(ipt) == [*BUILTIN_FILTER, ":A -", ":B -", ":C -"]
    assert rules(ipt) == ["-A A -j ACCEPT", "-A B -j A", "-A C -j RETURN"]


def test_contract_chain_line_flushes_that_chain_only(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE)
    restore(ipt, "*filter", "-A A -j DROP", "COMMIT")  # existing chain: no line needed
    assert rules(ipt) == ["-A A -j ACCEPT", "-A A -j DROP", "-A B -j A"]
    restore(ipt, "*filter", ":A - [0:0]", "-A A -j RETURN", "COMMIT")
    assert rules(ipt) == ["-A A -j RETURN", "-A B -j A"]
    # Twice in one input: the second line flushes again.
    restore(ipt, "*filter", ":A - [0:0]", "-A A -j DROP", ":A - [0:0]", "COMMIT")
    assert rules(ipt) == ["-A B -j A"]


def test_contract_builtin_chain_line_sets_policy_without_flushing(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE[:-1], "-A INPUT -j B", "COMMIT")
    restore(ipt, "*filter", ":INPUT - [0:0]", ":FORWARD DROP [0:0]", "COMMIT")
    assert chains(ipt)[:3] == [":INPUT ACCEPT", ":FORWARD DROP", ":OUTPUT ACCEPT"]
    assert rules(ipt)[0] == "-A INPUT -j B"


def test_contract_without_noflush_the_table_is_replaced(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE[:-1], ":FORWARD DROP [0:0]", "-A INPUT -j B", "COMMIT")
    restore(ipt, "*nat", ":N - [0:0]", "-A N -j RETURN", "COMMIT")
    restore(ipt, "*filter", ":Z - [0:0]", "-A Z -j RETURN", "COMMIT", noflush=False)
    # User chains gone, built-in chains flushed. (A built-in policy the input doesn't
    # mention survives in legacy but is reset to ACCEPT by nft, so it isn't compared.)
    assert [c.split()[0] for c in chains(ipt)] == [":INPUT", ":FORWARD", ":OUTPUT", ":Z"]
    assert rules(ipt) == ["-A Z -j RETURN"]
    assert rules(ipt, "nat") == ["-A N -j RETURN"]  # other tables untouched


def test_contract_counters(ipt: IptablesBackend) -> None:
    restore(
        ipt, "*filter", ":INPUT DROP [5:600]", ":C - [7:700]", "[3:300] -A C -j ACCEPT",
        "-A C -j RETURN -c 4 400", "-A INPUT -j C", "COMMIT",
    )  # fmt: skip
    chain_lines, rule_lines = tables_of(ipt.save("filter", counters=True), counters=True)["filter"]
    assert ":INPUT DROP [5:600]" in chain_lines
    assert ":C - [0:0]" in chain_lines  # user chains have no counters of their own
    assert rule_lines == ["[0:0] -A INPUT -j C", "[3:300] -A C -j ACCEPT",
                          "[4:400] -A C -j RETURN"]  # fmt: skip
    # Without --counters the [p:b] prefix is ignored (an explicit -c still counts).
    restore(ipt, "*filter", ":C - [0:0]", "[3:300] -A C -j ACCEPT", "COMMIT", counters=False)
    _, rule_lines = tables_of(ipt.save("filter", counters=True), counters=True)["filter"]
    assert "[0:0] -A C -j ACCEPT" in rule_lines
    # Without -c, save prints no rule counters.
    assert not any(_COUNTERS.match(line) for line in ipt.save("filter").splitlines())


KUBE_INPUT = (
    "*filter",
    ":KUBE-FORWARD - [0:0]",
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
    "-m mark --mark 0x4000/0x4000 -j ACCEPT",
    "COMMIT",
    "*nat",
    ":KUBE-SERVICES - [0:0]",
    ":KUBE-POSTROUTING - [0:0]",
    ":KUBE-MARK-MASQ - [0:0]",
    ":KUBE-SVC-ABC - [0:0]",
    ":KUBE-SEP-ONE - [0:0]",
    ":KUBE-SEP-TWO - [0:0]",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    "-j MASQUERADE --random-fully",
    "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
    # kube-proxy's own order; iptables-save moves -d/-p first and quotes the comment.
    "-A KUBE-SERVICES -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 172.30.0.41 "
    "--dport 80 -j KUBE-SVC-ABC",
    '-A KUBE-SVC-ABC -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
    "-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-ONE",
    '-A KUBE-SVC-ABC -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-TWO',
    "-A KUBE-SEP-ONE -m comment --comment ns1/svc1:p80 -s 10.180.0.1/32 -j KUBE-MARK-MASQ",
    "-A KUBE-SEP-ONE -m comment --comment ns1/svc1:p80 -m tcp -p tcp "
    "-j DNAT --to-destination 10.180.0.1:80",
    "-A KUBE-SEP-TWO -p tcp --dport 80 -j DNAT --to-destination 10.180.0.2:80",
    "COMMIT",
)
KUBE_SAVED_NAT_RULES = [
    "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    "-j MASQUERADE --random-fully",
    '-A KUBE-SEP-ONE -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ',
    '-A KUBE-SEP-ONE -p tcp -m comment --comment "ns1/svc1:p80" -m tcp '
    "-j DNAT --to-destination 10.180.0.1:80",
    "-A KUBE-SEP-TWO -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.180.0.2:80",
    '-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80" '
    "-m tcp --dport 80 -j KUBE-SVC-ABC",
    '-A KUBE-SVC-ABC -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
    "-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ONE",
    '-A KUBE-SVC-ABC -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-TWO',
]


def test_contract_save_round_trip(ipt: IptablesBackend) -> None:
    restore(ipt, *KUBE_INPUT)
    saved = ipt.save()
    assert tables_of(saved)["nat"][1] == KUBE_SAVED_NAT_RULES
    assert tables_of(saved)["filter"][1] == [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        "-m mark --mark 0x4000/0x4000 -j ACCEPT",
    ]
    # Feeding the save back in (replacing the tables) reproduces it exactly.
    ipt.restore(saved, noflush=False)
    assert tables_of(ipt.save()) == tables_of(saved)
    # ensure_rule/delete_rule find rules written in either order.
    assert ipt.ensure_rule(
        RulePosition.APPEND, "nat", "KUBE-SEP-TWO",
        ["-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination",
         "10.180.0.2:80"],
    )  # fmt: skip


def test_contract_unknown_jump_rejected_with_line_and_context(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE)
    before = ipt.save("filter")
    text = "\n".join([
        "*nat", ":N1 - [0:0]", "-A N1 -j RETURN", "COMMIT",
        "*filter", ":A - [0:0]", "-A A -j DROP", "-A A -j NOSUCH", "COMMIT", "",
    ])  # fmt: skip
    with pytest.raises(RestoreError) as info:
        ipt.restore(text)
    err = info.value
    assert isinstance(err, KProxyError)
    # legacy blames the rule (8), nft the COMMIT that resolves it (9).
    assert err.line in (8, 9)
    assert (8, "-A A -j NOSUCH") in err.context
    assert err.stderr and err.text == text
    assert "-A A -j NOSUCH" in str(err)
    # Atomic per table: filter untouched, the nat section before it was committed.
    assert tables_of(ipt.save("filter")) == tables_of(before)
    assert rules(ipt, "nat") == ["-A N1 -j RETURN"]


def test_contract_jump_to_chain_declared_later_rejected(ipt: IptablesBackend) -> None:
    with pytest.raises(RestoreError) as info:
        restore(ipt, "*filter", ":A - [0:0]", "-A A -j B", ":B - [0:0]", "COMMIT")
    assert info.value.line in (3, 5)


def test_contract_rule_before_its_chain_line_rejected(ipt: IptablesBackend) -> None:
    with pytest.raises(RestoreError) as info:
        restore(ipt, "*filter", "-A NEWC -j ACCEPT", ":NEWC - [0:0]", "COMMIT")
    assert info.value.line == 2
    assert ":NEWC -" not in chains(ipt)


def test_contract_bad_table_rejected(ipt: IptablesBackend) -> None:
    with pytest.raises(RestoreError) as info:
        restore(ipt, "*bogus", ":X - [0:0]", "COMMIT")
    assert info.value.line == 1


def test_contract_missing_commit_rejected_and_nothing_applied(ipt: IptablesBackend) -> None:
    with pytest.raises(RestoreError) as info:
        restore(ipt, "*filter", ":BAZ - [0:0]", "-A BAZ -j ACCEPT")
    assert info.value.line == 4
    assert ":BAZ -" not in chains(ipt)


@pytest.mark.parametrize(
    "bad",
    [
        "-I A 3 -j ACCEPT",  # index past the end
        "-D A -j QUEUE",  # no such rule
        "-N A",  # exists
        ":ABCDEFGHIJKLMNOPQRSTUVWXYZ012 - [0:0]",  # 29 chars
        "-A A -m nosuchmatch -j ACCEPT",
        "-A A -s 10.0.0.300 -j ACCEPT",
        "-A A -j INPUT",  # built-in chains are not jump targets
        "-A NOPE -j ACCEPT",
        "bogus words",
    ],
)
def test_contract_rejected_lines(ipt: IptablesBackend, bad: str) -> None:
    restore(ipt, "*filter", ":A - [0:0]", "-A A -j RETURN", "COMMIT")
    before = tables_of(ipt.save("filter"))
    with pytest.raises(RestoreError) as info:
        restore(ipt, "*filter", bad, "COMMIT")
    assert info.value.line in (2, 3)  # nft blames some of these on the COMMIT
    assert tables_of(ipt.save("filter")) == before


def test_contract_tables_argument_selects_sections(ipt: IptablesBackend) -> None:
    ipt.restore("*filter\n:F - [0:0]\nCOMMIT\n*nat\n:N - [0:0]\nCOMMIT\n", tables=["nat"])
    assert ":N -" in chains(ipt, "nat")
    assert ":F -" not in chains(ipt)


def test_contract_delete_chain(ipt: IptablesBackend) -> None:
    restore(ipt, *BASE[:-1], ":E - [0:0]", "COMMIT")
    restore(ipt, "*filter", "-X E", "COMMIT")  # empty, unreferenced
    assert ":E -" not in chains(ipt)
    for bad in ("-X A", "-X B", "-X NOPE"):  # referenced / not empty / missing
        with pytest.raises(RestoreError) as info:
            restore(ipt, "*filter", bad, "COMMIT")
        assert info.value.line == 2
    # kube-proxy's stale-chain idiom: a chain line (flush) then -X.
    restore(ipt, "*filter", ":B - [0:0]", "-X B", "COMMIT")
    assert chains(ipt) == [*BUILTIN_FILTER, ":A -"]
    with pytest.raises(IptablesError):
        ipt.delete_chain("filter", "NOPE")


def test_contract_ensure_chain_and_rule_are_idempotent(ipt: IptablesBackend) -> None:
    assert not ipt.chain_exists("filter", "KUBE-X")
    assert ipt.ensure_chain("filter", "KUBE-X") is False
    assert ipt.ensure_chain("filter", "KUBE-X") is True
    assert ipt.chain_exists("filter", "KUBE-X")
    jump = ["-m", "comment", "--comment", "kubernetes x", "-j", "KUBE-X"]
    assert ipt.ensure_rule(RulePosition.APPEND, "filter", "INPUT", ["-j", "ACCEPT"]) is False
    assert ipt.ensure_rule(RulePosition.PREPEND, "filter", "INPUT", jump) is False
    assert ipt.ensure_rule(RulePosition.PREPEND, "filter", "INPUT", jump) is True
    assert ipt.ensure_rule(RulePosition.APPEND, "filter", "INPUT", ["-j", "ACCEPT"]) is True
    assert rules(ipt) == [
        '-A INPUT -m comment --comment "kubernetes x" -j KUBE-X',
        "-A INPUT -j ACCEPT",
    ]
    with pytest.raises(IptablesError):  # referenced
        ipt.delete_chain("filter", "KUBE-X")
    ipt.delete_rule("filter", "INPUT", jump)
    ipt.delete_rule("filter", "INPUT", jump)  # already gone: no error
    ipt.ensure_rule(RulePosition.APPEND, "filter", "KUBE-X", ["-j", "RETURN"])
    ipt.flush_chain("filter", "KUBE-X")
    ipt.delete_chain("filter", "KUBE-X")
    assert not ipt.chain_exists("filter", "KUBE-X")
    with pytest.raises(IptablesError):  # missing chain
        ipt.ensure_rule(RulePosition.APPEND, "filter", "NOPE", ["-j", "ACCEPT"])


def test_contract_ip6tables(make: Make) -> None:
    ip4, ip6 = make("ipv4"), make("ipv6")
    assert ip6.family == "ipv6"
    restore(ip6, "*filter", ":S - [0:0]", "-A S -s fd00::1 -j ACCEPT", "COMMIT")
    assert rules(ip6) == ["-A S -s fd00::1/128 -j ACCEPT"]
    assert ":S -" not in chains(ip4)
    with pytest.raises(RestoreError) as info:
        restore(ip6, "*filter", "-A S -s 10.0.0.1 -j ACCEPT", "COMMIT")
    assert info.value.line == 2
    ip6.ensure_rule(RulePosition.APPEND, "nat", "POSTROUTING", ["-d", "fd00::/64", "-j", "RETURN"])
    assert rules(ip6, "nat") == ["-A POSTROUTING -d fd00::/64 -j RETURN"]


def test_contract_capabilities(ipt: IptablesBackend) -> None:
    assert ipt.version() >= (1, 8, 0)
    assert ipt.has_random_fully() is True


# -- auto-detection --------------------------------------------------------------------

HINT_MANGLE = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
CANARY_MANGLE = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
RULES_3 = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j A\n-A INPUT -j B\n-A INPUT -j C\nCOMMIT\n"
RULES_1 = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j A\nCOMMIT\n"


@pytest.mark.parametrize(
    ("legacy", "nft", "expected"),
    [
        ("", "", "nft"),  # nothing anywhere: nft is the default
        (RULES_3, RULES_1 + HINT_MANGLE, "nft"),  # kubelet's hint wins over rule counts
        (HINT_MANGLE, HINT_MANGLE, "nft"),  # nft is checked first
        (HINT_MANGLE, RULES_3, "legacy"),
        (CANARY_MANGLE, "", "legacy"),
        (RULES_3, RULES_1, "legacy"),  # more legacy rules
        (RULES_1, RULES_1, "nft"),  # a tie goes to nft
        (RULES_1, RULES_3, "nft"),
        # nft's hint counts only in its mangle table; a same-named chain elsewhere doesn't.
        (RULES_3, "*filter\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n", "legacy"),
        # Only chain lines count as hints, not a mention in a rule.
        (RULES_3, "*mangle\n-A X -j KUBE-KUBELET-CANARY\nCOMMIT\n", "legacy"),
    ],
)
def test_choose_backend(legacy: str, nft: str, expected: str) -> None:
    assert choose_backend(legacy, nft) == expected


@pytest.mark.netns
@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ([], "nft"),
        ([("legacy", "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")], "legacy"),
        ([("legacy", RULES_3.replace(":INPUT ACCEPT [0:0]", ":INPUT ACCEPT [0:0]\n:A - [0:0]\n"
                                     ":B - [0:0]\n:C - [0:0]"))], "legacy"),
        ([("legacy", "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"),
          ("nft", "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n")], "nft"),
    ],
)  # fmt: skip
def test_detect_backend_in_netns(
    netns: NetnsFactory, setup: list[tuple[str, str]], expected: str
) -> None:
    ns = netns()
    for backend, text in setup:
        ns.run([f"iptables-{backend}-restore", "--noflush"], input=text)
    assert detect_backend(ns.name) == expected
    assert Iptables("ipv4", "auto", netns=ns.name).backend == expected


# -- pure helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        ("iptables-restore v1.8.9 (legacy): Couldn't load target `NOSUCH':No such file or "
         "directory\n\nError occurred at line: 4\nTry `iptables-restore -h' ...\n", 4),
        ("iptables-nft-restore v1.8.9 (nf_tables): Chain 'NOSUCH' does not exist\n"
         "Error occurred at line: 5\n", 5),
        ("iptables-restore: line 2 failed\n", 2),
        ("iptables-nft-restore: line 2 failed: No chain/target/match by that name.\n", 2),
        ("iptables-restore: COMMIT expected at line 4\n", 4),
        ("iptables-nft-restore v1.8.9 (nf_tables): \nline 3: CHAIN_DEL failed (Device or "
         "resource busy): chain FOO\n", 3),
        ("iptables-nft-restore: line 1 table name 'bogus' invalid\nError occurred at line: 1\n",
         1),
        ("something else entirely\n", None),
    ],
)  # fmt: skip
def test_parse_error_line(stderr: str, line: int | None) -> None:
    assert parse_error_line(stderr) == line


def test_restore_error_keeps_input() -> None:
    text = "".join(f"line{i}\n" for i in range(1, 11))
    err = RestoreError("boom", text=text, line=5, stderr="x: line 5 failed")
    assert err.context == tuple((i, f"line{i}") for i in range(2, 9))
    assert ">     5  line5" in str(err) and err.stderr == "x: line 5 failed"
    assert RestoreError("boom", text=text, line=None).context == ()


def test_select_tables_keeps_line_numbers() -> None:
    text = "*filter\n:F - [0:0]\nCOMMIT\n*nat\n:N - [0:0]\nCOMMIT\n"
    out = select_tables(text, {"nat"})
    assert out.splitlines() == ["#", "#", "#", "*nat", ":N - [0:0]", "COMMIT"]
    assert select_tables(text, None) == text


class _Recorder:
    def __init__(self, version: str) -> None:
        self.version = version
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        out = self.version if "--version" in argv else ""
        return subprocess.CompletedProcess(list(argv), 0, out, "")


@pytest.mark.parametrize(
    ("version", "cmd_flags", "restore_flags", "random_fully"),
    [
        ("iptables v1.8.9 (nf_tables)", ["-w", "5"], ["-w", "5"], True),
        ("iptables v1.8.7 (legacy)", ["-w", "5", "-W", "100000"], ["-w", "5", "-W", "100000"],
         True),
        ("iptables v1.6.1", ["-w", "5", "-W", "100000"], [], False),
        ("iptables v1.4.21", ["-w"], [], False),
        ("iptables v1.4.19", [], [], False),
    ],
)  # fmt: skip
def test_flags_follow_version(
    version: str, cmd_flags: list[str], restore_flags: list[str], random_fully: bool
) -> None:
    run = _Recorder(version)
    ipt = Iptables("ipv6", "legacy", netns="kpt-x", run=run)
    assert ipt.wait_flags() == cmd_flags
    assert ipt.restore_wait_flags() == restore_flags
    assert ipt.has_random_fully() is random_fully
    ipt.restore("*filter\nCOMMIT\n", counters=False)
    assert run.calls[-1] == ["ip", "netns", "exec", "kpt-x", "ip6tables-legacy-restore",
                             *restore_flags, "--noflush"]  # fmt: skip
    assert parse_version(version) == ipt.version()


def test_both_implement_the_protocol() -> None:
    assert isinstance(FakeIptables(), IptablesBackend)
    assert isinstance(Iptables(), IptablesBackend)
