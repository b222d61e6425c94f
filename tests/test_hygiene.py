"""Size budgets and the layer contract of the package, checked like any other behaviour.

No module in ``recloop/`` over ``MODULE_LINES`` lines and no function over ``FUNCTION_LINES``:
past those sizes two ideas usually share a room. The few known exceptions are listed below, each
with its size today and the reason it is still over; a listed entry may only shrink (the test
fails when it grows, and when it no longer needs its entry, so the list is kept short). The
layers (which package may import which) and the absence of import cycles are an import-linter
contract in pyproject.toml, run here and by ``make lint``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "recloop"
MODULE_LINES = 500
FUNCTION_LINES = 60

# path relative to the repository root -> (lines today, why it is still over the budget)
MODULE_ALLOWANCES: dict[str, tuple[int, str]] = {}

# "path:qualified.name" -> (lines today, why it is still over the budget)
FUNCTION_ALLOWANCES: dict[str, tuple[int, str]] = {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _functions(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method in ``path``."""
    found: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return found


def _over_budget(
    sizes: dict[str, int], budget: int, allowances: dict[str, tuple[int, str]]
) -> list[str]:
    problems = []
    for name, size in sorted(sizes.items()):
        allowed = allowances.get(name)
        if allowed is None:
            if size > budget:
                problems.append(f"{name}: {size} lines, over the budget of {budget}")
        elif size > allowed[0]:
            problems.append(f"{name}: {size} lines, grew past its allowance of {allowed[0]}")
        elif size <= budget:
            problems.append(f"{name}: {size} lines, within budget now: remove its allowance")
    for name in sorted(set(allowances) - set(sizes)):
        problems.append(f"{name}: allowance for something that no longer exists: remove it")
    for name, (_, reason) in sorted(allowances.items()):
        if len(reason.split()) < 4:
            problems.append(f"{name}: its allowance must say why it is still over the budget")
    return problems


def test_modules_are_within_their_line_budget() -> None:
    sizes = {_relative(p): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    assert _over_budget(sizes, MODULE_LINES, MODULE_ALLOWANCES) == []


def test_functions_are_within_their_line_budget() -> None:
    sizes = {
        f"{_relative(path)}:{name}": length
        for path in _modules()
        for name, _, length in _functions(path)
    }
    assert _over_budget(sizes, FUNCTION_LINES, FUNCTION_ALLOWANCES) == []


def test_budget_check_catches_growth_and_stale_entries() -> None:
    allowances = {"a.py": (600, "one reason of some words"), "gone.py": (700, "it was a long file")}
    problems = _over_budget({"a.py": 601, "b.py": 501, "c.py": 10}, 500, allowances)
    assert problems == [
        "a.py: 601 lines, grew past its allowance of 600",
        "b.py: 501 lines, over the budget of 500",
        "gone.py: allowance for something that no longer exists: remove it",
    ]
    assert _over_budget({"a.py": 400}, 500, {"a.py": (600, "r")}) == [
        "a.py: 400 lines, within budget now: remove its allowance",
        "a.py: its allowance must say why it is still over the budget",
    ]


def test_function_sizes_count_methods_and_nested_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "class A:\n    def f(self):\n        def g():\n            pass\n        return g\n"
    )
    assert _functions(source) == [("A.f", 2, 4), ("A.f.g", 3, 2)]


def test_layers_point_down_and_imports_have_no_cycles() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail(f"{lint_imports} is missing: run `make setup` (import-linter is pinned)")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
