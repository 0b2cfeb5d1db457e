"""The rule-churn bench's pure part still runs (its kernel part runs in ``make bench``).

Tiny sizes, no root, no timing assertions: this only keeps bench/rule_churn.py
from rotting as the renderer and the proxy core change under it.
"""

from __future__ import annotations

from pathlib import Path

from bench import rule_churn
from kproxy import _fastpath_py, fastpath
from kproxy.proxy.iptables.render import IPTablesRenderer


def test_render_steps_without_kernel(tmp_path: Path) -> None:
    rows = rule_churn.run([3, 7], endpoints=4, repeats=1, backends=())
    assert [r["services"] for r in rows] == [3, 7]
    for r in rows:
        assert r["render_twin_s"] is not None and r["rules"] > 0
        assert r["legacy_apply_s"] is None and r["nft_apply_s"] is None
        assert (r["render_compiled_s"] is not None) == fastpath.COMPILED
    assert "svc" in rule_churn.table(rows)
    paths = rule_churn.write_outputs(rows, {"bench": "smoke"}, tmp_path)
    assert {p.name for p in paths} >= {"rule_churn.csv", "rule_churn.json"}


def test_workload_renders_the_same_with_both_implementations() -> None:
    snap = rule_churn.build_core(5, 3).snapshot()
    texts = []
    modules = [_fastpath_py]
    compiled = rule_churn.compiled_module()
    if compiled is not None:
        modules.append(compiled)
    for module in modules:
        with rule_churn.implementation(module):
            r = IPTablesRenderer(rule_churn.render_options())
            texts.append(r.render(snap.services, snap.endpoints, full=True).text)
    assert all(t == texts[0] for t in texts)
    # 5 services x 3 endpoints: one SEP chain each, and NodePorts for odd services.
    assert texts[0].count(":KUBE-SEP-") == 15
    assert "-A KUBE-NODEPORTS" in texts[0]
    # The swap is undone.
    selected = compiled if fastpath.COMPILED else _fastpath_py
    assert fastpath.service_to_endpoint_rules is selected.service_to_endpoint_rules


def test_main_render_only(tmp_path: Path) -> None:
    assert (
        rule_churn.main(["--steps", "2", "--no-kernel", "--repeats", "1", "--out", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "rule_churn.json").exists()
