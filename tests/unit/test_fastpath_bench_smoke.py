"""The userspace fast-path bench still runs (tiny sizes, no timing assertions)."""

from __future__ import annotations

from pathlib import Path

from bench import userspace_fastpath


def test_bench_quick(tmp_path: Path) -> None:
    assert (
        userspace_fastpath.main(
            ["--quick", "--relay-mib", "8", "--relay-seconds", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    assert (tmp_path / "userspace_fastpath.json").exists()


def test_disruption_is_small() -> None:
    from kproxy import _fastpath_py

    assert userspace_fastpath.disruption(_fastpath_py, 10) < 0.01


def test_fastpath_exports_every_twin_name() -> None:
    # bench/rule_churn.py swaps every name of the twin's __all__ on kproxy.fastpath.
    from kproxy import _fastpath_py, fastpath

    missing = [n for n in _fastpath_py.__all__ if not hasattr(fastpath, n)]
    assert missing == []
