"""The compiled fast path and its pure twin agree, and both match upstream.

The known vectors are the chain hashes of upstream's golden dumps (reference
iptables-upstream.md §2).  Property tests then hold the two implementations to
each other on arbitrary input.  Under ``KPROXY_NO_EXTENSIONS=1`` only the twin
is loaded, so the compiled half is skipped there and exercised in the default
run (CI sets ``KPROXY_REQUIRE_EXTENSIONS=1``, so the compiled module must be
there).
"""

from __future__ import annotations

import base64
import hashlib
import os
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kproxy import _fastpath_py, fastpath
from tests.support.impls import COMPILED, IMPLS, needs_compiled

KNOWN = [
    (("ns1/svc1:p80", "tcp"), "XPGD46QRK7WJZT7O"),
    (("ns4/svc4:p80", "tcp"), "4SW47YFZTEDKD3PK"),
]
KNOWN_EP = [(("ns1/svc1:p80", "tcp", "10.180.0.1:80"), "SXIVWICOYRO3J4NJ")]


def _reference(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def test_selection_follows_environment() -> None:
    if os.environ.get("KPROXY_NO_EXTENSIONS") == "1":
        assert fastpath.IMPLEMENTATION == "kproxy._fastpath_py"
        assert not fastpath.COMPILED
    elif COMPILED is not None:
        assert fastpath.IMPLEMENTATION == "kproxy._fastpath"
        assert fastpath.COMPILED


def test_same_public_api() -> None:
    if COMPILED is None:
        pytest.skip("extension not built")
    assert set(_fastpath_py.__all__) == set(COMPILED.__all__)
    for name in _fastpath_py.__all__:
        assert hasattr(COMPILED, name), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("args", "expected"), KNOWN)
def test_upstream_service_hashes(impl: ModuleType, args: tuple[str, str], expected: str) -> None:
    assert impl.port_proto_hash(*args) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("args", "expected"), KNOWN_EP)
def test_upstream_endpoint_hashes(
    impl: ModuleType, args: tuple[str, str, str], expected: str
) -> None:
    assert impl.endpoint_hash(*args) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000])
def test_hash_block_boundaries(impl: ModuleType, length: int) -> None:
    # SHA-256 padding changes shape at 56 and 64 bytes; check every edge.
    text = "x" * length
    assert impl.port_proto_hash(text, "") == _reference(text)


@given(st.text(), st.sampled_from(["tcp", "udp", "sctp", ""]))
def test_twin_matches_reference(name: str, proto: str) -> None:
    assert _fastpath_py.port_proto_hash(name, proto) == _reference(name + proto)


@needs_compiled
@given(st.text(), st.sampled_from(["tcp", "udp", "sctp"]), st.text(max_size=60))
def test_compiled_matches_twin(name: str, proto: str, endpoint: str) -> None:
    assert COMPILED is not None
    assert COMPILED.port_proto_hash(name, proto) == _fastpath_py.port_proto_hash(name, proto)
    assert COMPILED.endpoint_hash(name, proto, endpoint) == _fastpath_py.endpoint_hash(
        name, proto, endpoint
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_round_robin_basics(impl: ModuleType) -> None:
    rr = impl.RoundRobin(["a", "b", "c"])
    assert [rr.next() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert rr.set_endpoints(["a", "b", "c"]) is False  # equal list keeps the position
    assert rr.next() == "b"
    assert rr.set_endpoints(["x", "y"]) is True  # a new list restarts the rotation
    assert rr.next() == "x"
    assert len(rr) == 2
    assert rr.endpoints == ("x", "y")
    rr.set_endpoints([])
    with pytest.raises(LookupError):
        rr.next()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("next"), st.none()),
        st.tuples(st.just("set"), st.lists(st.sampled_from("abcde"), max_size=4)),
    ),
    max_size=60,
)


@needs_compiled
@given(st.lists(st.sampled_from("abcde"), max_size=5), _ops)
def test_round_robin_parity(initial: list[str], ops: list[tuple[str, list[str] | None]]) -> None:
    assert COMPILED is not None
    pure, fast = _fastpath_py.RoundRobin(initial), COMPILED.RoundRobin(initial)
    for op, arg in ops:
        if op == "set":
            assert arg is not None
            assert pure.set_endpoints(arg) == fast.set_endpoints(arg)
        else:
            try:
                expected: str | None = pure.next()
            except LookupError:
                expected = None
            if expected is None:
                with pytest.raises(LookupError):
                    fast.next()
            else:
                assert fast.next() == expected
        assert pure.index == fast.index
        assert pure.endpoints == fast.endpoints


# -- rule rendering ------------------------------------------------------------
# Endpoint strings as the renderer passes them: "IP:port" (IPv6 bracketed) and
# the IP alone; SEP names as the hash makes them.
_ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_ipv6 = st.lists(st.sampled_from(["fd00", "1", "a", "ffff", "0"]), min_size=2, max_size=4).map(
    lambda parts: ":".join(parts) + "::1"
)
_endpoint = st.tuples(st.one_of(_ipv4, _ipv6), st.integers(1, 65535))
_endpoints = st.lists(_endpoint, max_size=40, unique=True)
_name = st.from_regex(r"[a-z0-9-]{1,12}/[a-z0-9-]{1,12}(:[a-z0-9-]{1,8})?", fullmatch=True)


def _strings(name: str, eps: list[tuple[str, int]]) -> tuple[list[str], list[str], list[str]]:
    keys = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in eps]
    seps = _fastpath_py.endpoint_chain_names(name, "tcp", keys)
    return keys, [ip for ip, _ in eps], seps


@pytest.mark.parametrize("impl", IMPLS)
def test_endpoint_rules_match_upstream_layout(impl: ModuleType) -> None:
    # TestOverallIPTablesRules' ns5/svc5 (ClientIP affinity, one endpoint, lines
    # from the golden dump), and the probability chain of three endpoints.
    keys, seps = ["10.180.0.3:80"], ["KUBE-SEP-I77PXRDZVX7PMWMN"]
    assert impl.service_to_endpoint_rules(
        "KUBE-SVC-NUKIZ6OKUXPJNT4C", "ns5/svc5:p80", keys, seps, True, 10800, True
    ) == [
        '-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80"'
        " -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap"
        " -j KUBE-SEP-I77PXRDZVX7PMWMN",
        '-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80"'
        " -j KUBE-SEP-I77PXRDZVX7PMWMN",
    ]
    assert impl.endpoint_chain_rules(
        "ns5/svc5:p80", "-m tcp -p tcp", keys, seps, ["10.180.0.3"], True, True
    ) == (
        [":KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]"],
        [
            "-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80"
            " -s 10.180.0.3 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80"
            " -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp"
            " -j DNAT --to-destination 10.180.0.3:80",
        ],
    )
    three = impl.service_to_endpoint_rules("C", "n", ["a", "b", "c"], ["A", "B", "C"], 0, 0, 0)
    assert three == [
        "-A C -m statistic --mode random --probability 0.3333333333 -j A",
        "-A C -m statistic --mode random --probability 0.5000000000 -j B",
        "-A C -j C",
    ]
    assert impl.endpoint_chain_names("ns1/svc1:p80", "tcp", ["10.180.0.1:80"]) == [
        "KUBE-SEP-SXIVWICOYRO3J4NJ"
    ]
    assert impl.endpoint_chain_names("ns5/svc5:p80", "tcp", keys) == seps


@pytest.mark.parametrize("impl", IMPLS)
def test_rule_builders_reject_ragged_input(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.service_to_endpoint_rules("C", "n", ["a", "b"], ["A"], False, 0, True)
    with pytest.raises(ValueError):
        impl.endpoint_chain_rules("n", "-m tcp -p tcp", ["a"], ["A"], [], False, True)
    with pytest.raises(ValueError):
        impl.probability(0)
    assert impl.service_to_endpoint_rules("C", "n", [], [], True, 5, True) == []
    assert impl.endpoint_chain_rules("n", "m", [], [], [], True, True) == ([], [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 1000, 100001])
def test_probability_is_gos_format(impl: ModuleType, n: int) -> None:
    assert impl.probability(n) == "%0.10f" % (1.0 / n)


@needs_compiled
@given(
    _name,
    _endpoints,
    st.booleans(),
    st.integers(0, 86400),
    st.booleans(),
    st.sampled_from(["KUBE-SVC-", "KUBE-SVL-"]),
)
def test_service_to_endpoint_rules_parity(
    name: str,
    eps: list[tuple[str, int]],
    affinity: bool,
    seconds: int,
    comments: bool,
    prefix: str,
) -> None:
    assert COMPILED is not None
    keys, _, seps = _strings(name, eps)
    chain = prefix + _fastpath_py.port_proto_hash(name, "tcp")
    args = (chain, name, keys, seps, affinity, seconds, comments)
    assert COMPILED.service_to_endpoint_rules(*args) == _fastpath_py.service_to_endpoint_rules(
        *args
    )
    # Tuples (what the renderer passes) and lists give the same lines.
    t_args = (chain, name, tuple(keys), tuple(seps), affinity, seconds, comments)
    assert COMPILED.service_to_endpoint_rules(*t_args) == COMPILED.service_to_endpoint_rules(*args)


@needs_compiled
@given(
    _name,
    _endpoints,
    st.booleans(),
    st.booleans(),
    st.sampled_from(["-m tcp -p tcp", "-m udp -p udp", "-m sctp -p sctp"]),
)
def test_endpoint_chain_rules_parity(
    name: str, eps: list[tuple[str, int]], affinity: bool, comments: bool, match: str
) -> None:
    assert COMPILED is not None
    keys, ips, seps = _strings(name, eps)
    assert COMPILED.endpoint_chain_names(name, "tcp", keys) == seps
    args = (name, match, keys, seps, ips, affinity, comments)
    assert COMPILED.endpoint_chain_rules(*args) == _fastpath_py.endpoint_chain_rules(*args)


@needs_compiled
@given(st.text(max_size=40), st.sampled_from(["tcp", "udp", ""]), st.lists(st.text(max_size=30)))
def test_endpoint_chain_names_parity(name: str, proto: str, endpoints: list[str]) -> None:
    assert COMPILED is not None
    assert COMPILED.endpoint_chain_names(name, proto, endpoints) == [
        "KUBE-SEP-" + _reference(name + proto + ep) for ep in endpoints
    ]


@needs_compiled
@given(st.integers(1, 5000))
def test_probability_parity(n: int) -> None:
    assert COMPILED is not None
    assert COMPILED.probability(n) == _fastpath_py.probability(n)
