"""The dependency direction of DESIGN.md §2 holds, and the check really bites."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support import layering


def test_contracts_kept() -> None:
    result = layering.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def _copy_package(dst: Path) -> None:
    shutil.copy(layering.REPO / "pyproject.toml", dst / "pyproject.toml")
    shutil.copytree(
        layering.REPO / "kproxy",
        dst / "kproxy",
        ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"),
    )


def test_lower_layer_importing_higher_fails(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    # kproxy.errors is the bottom layer: make it reach up into the fast path.
    errors = tmp_path / "kproxy" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport kproxy.fastpath  # layering violation\n")
    result = layering.run(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


def test_kernel_importing_a_component_fails(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    (tmp_path / "kproxy" / "proxy").mkdir(exist_ok=True)
    (tmp_path / "kproxy" / "proxy" / "__init__.py").write_text('"""stand-in"""\n')
    kernel = tmp_path / "kproxy" / "kernel" / "__init__.py"
    kernel.write_text(kernel.read_text() + "\nimport kproxy.proxy  # layering violation\n")
    result = layering.run(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
