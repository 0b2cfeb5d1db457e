"""Run the import-linter contracts of pyproject.toml over the packages that exist.

DESIGN.md §2 fixes the dependency direction for packages that appear over
time; import-linter insists that every module a `forbidden` or
`independence` contract names exists.  This wrapper reads the contracts from
pyproject.toml, drops the modules that do not exist yet (a package appears
when it has code) and runs ``lint-imports`` on the result, so the contracts
are written once, for the whole design, and bite as soon as a package lands.

``python -m tests.support.layering [ROOT]`` exits like lint-imports.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _exists(root: Path, module: str) -> bool:
    rel = Path(*module.strip("()").split("."))
    return (root / rel / "__init__.py").is_file() or (root / rel).with_suffix(".py").is_file()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"unsupported config value {value!r}")


def effective_config(root: Path) -> str:
    """The import-linter config of ``root``'s pyproject, limited to existing modules."""
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[tool.importlinter]", f"root_package = {_toml_value(data['root_package'])}"]
    for contract in data["contracts"]:
        contract = dict(contract)
        kind = contract["type"]
        if kind == "forbidden":
            contract["source_modules"] = [m for m in contract["source_modules"] if _exists(root, m)]
            contract["forbidden_modules"] = [
                m for m in contract["forbidden_modules"] if _exists(root, m)
            ]
            if not contract["source_modules"] or not contract["forbidden_modules"]:
                continue
        elif kind == "independence":
            # Parentheses mark optional layers; independence contracts take bare names.
            contract["modules"] = [m.strip("()") for m in contract["modules"] if _exists(root, m)]
            if len(contract["modules"]) < 2:
                continue
        lines.append("")
        lines.append("[[tool.importlinter.contracts]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in contract.items())
    return "\n".join(lines) + "\n"


def run(root: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run lint-imports over ``root`` (a checkout holding pyproject.toml and kproxy/)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write(effective_config(root))
    lint = Path(sys.executable).with_name("lint-imports")
    try:
        return subprocess.run(
            [str(lint), cfg.name, "--no-cache"],
            cwd=root,
            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        Path(cfg.name).unlink()


if __name__ == "__main__":
    result = run(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)
