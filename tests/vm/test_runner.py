"""The host-side parts of the vm runner that need no VM: kernel discovery, report folding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.vm import find_kernel, fold_reports, guest_plugin_flags


def _kernel(boot: Path, modules: Path, release: str, ipvs: bool) -> None:
    (boot / f"vmlinuz-{release}").write_bytes(b"")
    if ipvs:
        (modules / release / "kernel/net/netfilter/ipvs").mkdir(parents=True)


def test_find_kernel_picks_the_newest_with_ipvs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KPROXY_VM_KERNEL", raising=False)
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    modules.mkdir()
    assert find_kernel(boot, modules) is None
    _kernel(boot, modules, "6.1.0-9-amd64", ipvs=True)
    _kernel(boot, modules, "6.1.0-56-amd64", ipvs=True)
    _kernel(boot, modules, "6.12.0-1-amd64", ipvs=False)  # no modules: unusable
    _kernel(boot, modules, "6.1.0-99-cloud-amd64", ipvs=True)
    _kernel(boot, modules, "6.1.0-3-amd64", ipvs=True)
    image, release = find_kernel(boot, modules) or (None, None)
    assert release == "6.1.0-99-cloud-amd64"
    assert image == boot / "vmlinuz-6.1.0-99-cloud-amd64"


def test_find_kernel_honours_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "vmlinuz-6.9.9-amd64"
    image.write_bytes(b"")
    monkeypatch.setenv("KPROXY_VM_KERNEL", str(image))
    assert find_kernel(tmp_path, tmp_path) == (image, "6.9.9-amd64")


def _line(nodeid: str, when: str, outcome: str, text: str = "", wasxfail: str | None = None) -> str:
    return json.dumps(
        {"nodeid": nodeid, "when": when, "outcome": outcome, "text": text, "wasxfail": wasxfail}
    )


def test_fold_reports() -> None:
    lines = [
        _line("t::ok", "setup", "passed"),
        _line("t::ok", "call", "passed"),
        _line("t::ok", "teardown", "passed"),
        _line("t::bad", "setup", "passed"),
        _line("t::bad", "call", "failed", "assert 1 == 2"),
        _line("t::bad", "teardown", "failed", "later noise"),
        _line("t::td", "call", "passed"),
        _line("t::td", "teardown", "failed", "boom"),
        _line("t::skip", "setup", "skipped", "needs root"),
        _line("t::xf", "call", "skipped", "", wasxfail="known bug"),
        json.dumps({"event": "finish", "exitstatus": 1}),
        "",
    ]
    got = fold_reports(lines)
    assert got["t::ok"].outcome == "passed"
    assert (got["t::bad"].outcome, got["t::bad"].text) == ("failed", "assert 1 == 2")
    assert got["t::td"].outcome == "failed"
    assert got["t::td"].text.startswith("[teardown failed inside the VM]")
    assert (got["t::skip"].outcome, got["t::skip"].text) == ("skipped", "needs root")
    assert (got["t::xf"].outcome, got["t::xf"].text) == ("xfailed", "known bug")
    assert set(got) == {"t::ok", "t::bad", "t::td", "t::skip", "t::xf"}


def test_guest_plugins_keep_hypothesis_only_when_addopts_use_it() -> None:
    assert guest_plugin_flags(["-ra", "--strict-markers"]) == [
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
    ]  # fmt: skip
    assert guest_plugin_flags(["--hypothesis-profile=ci"]) == ["-p", "no:cacheprovider"]
