"""The floors hold: the import contracts in `.importlinter` and "no SQL outside db/".

Both read the source, so they run in milliseconds and fail on the commit that breaks a floor,
before any behaviour changes.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "training", "producer", "worker", "emolabel")
# What builds or runs SQL; Session and the engine types stay importable for type hints.
SQL_BUILDERS = {"select", "insert", "update", "delete", "text", "func", "bindparam", "literal"}


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _sql_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    # A Redis pipeline also has .execute(): calls count only where SQLAlchemy is imported.
    uses_sqlalchemy = any(
        (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"))
        or (
            isinstance(node, ast.Import)
            and any(alias.name.startswith("sqlalchemy") for alias in node.names)
        )
        for node in ast.walk(tree)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}"
                for alias in node.names
                if alias.name in SQL_BUILDERS
            ]
        if (
            uses_sqlalchemy
            and isinstance(node, ast.Attribute)
            and node.attr in {"execute", "scalar", "scalars"}
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls .{node.attr}()")
    return found


def test_no_sql_outside_db() -> None:
    uses = [
        use
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for use in _sql_uses(path)
    ]
    assert uses == []


def test_the_sql_check_sees_sql() -> None:
    # The check above must be able to fail: db/ itself is full of it.
    assert _sql_uses(ROOT / "db" / "delivery.py") or any(
        _sql_uses(path) for path in (ROOT / "db").rglob("*.py")
    )


def _test_imports(path: Path) -> list[str]:
    """Imports of another test module or a conftest file: helpers live in tests/support/."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            last = name.rsplit(".", 1)[-1]
            if name.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                found.append(f"{_where(path)}:{node.lineno} imports {name}")
    return found


def _non_fixtures(path: Path) -> list[str]:
    """Top-level functions of a conftest file that are neither fixtures nor pytest hooks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{_where(path)}:{node.lineno} {node.name}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("pytest_")
        and not any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
    ]


def test_test_helpers_live_in_support_and_conftest_holds_fixtures_only() -> None:
    tests = ROOT / "tests"
    assert [use for path in sorted(tests.rglob("*.py")) for use in _test_imports(path)] == []
    assert [use for path in sorted(tests.rglob("conftest.py")) for use in _non_fixtures(path)] == []


def test_the_test_checks_see_what_they_refuse(tmp_path: Path) -> None:
    # Both checks above must be able to fail.
    probe = tmp_path / "conftest.py"
    probe.write_text("from tests.test_layers import ROOT\n\ndef helper():\n    return ROOT\n")
    assert _test_imports(probe) and _non_fixtures(probe)


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
