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
import importlib
import os
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kproxy import _fastpath_py, fastpath


def _compiled() -> ModuleType | None:
    try:
        return importlib.import_module("kproxy._fastpath")
    except ImportError:
        if os.environ.get("KPROXY_REQUIRE_EXTENSIONS") == "1":
            raise
        return None


COMPILED = _compiled()
IMPLS = [pytest.param(_fastpath_py, id="twin")]
if COMPILED is not None:
    IMPLS.append(pytest.param(COMPILED, id="compiled"))

needs_compiled = pytest.mark.skipif(COMPILED is None, reason="extension not built")

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
