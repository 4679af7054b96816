"""The floors of the code: every import of a project package points to a lower floor (README, "Code layout").

Read from the source text (every ``import``/``from`` statement, also inside functions and ``TYPE_CHECKING``
blocks), so an import that only runs on some path still counts.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOORS: dict[str, int] = {
    "collapse": 0,  # ground: errors, atomic writes, seeding, store, run dir, tracking, CLI, distributed, contract
    "datamodules": 1,  # data: workflows, the synthetic wrapper, real sources
    "samplers": 2,  # drawing from models that need more than one call
    "evaluation": 2,  # quality of generated data per domain
    "lit_modules": 3,  # models
    "callbacks": 4,  # Lightning callbacks
    "tooling": 5,  # reports, figures, grid launcher
    "engine": 6,  # the generation loops and the shared Trainer settings
    "recipes": 7,  # recipes only
}
"""Each project package and its floor; a package may import only packages on lower floors (and itself)."""

OUTSIDE = ("tests", "benchmarks")
"""Folders above every floor: they may import anything, and nothing imports them."""


def project_imports(path: Path, packages: Mapping[str, int]) -> list[tuple[int, str]]:
    """``(line, package)`` of every import of a project package in the Python file ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in packages]
    return found


def violations(root: Path, floors: Mapping[str, int]) -> list[str]:
    """Every import in ``root``'s packages that points to the same floor (another package) or a higher one."""
    bad = []
    for package, floor in floors.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in project_imports(path, floors):
                if target != package and floors[target] >= floor:
                    where = path.relative_to(root)
                    bad.append(f"{where}:{line} imports {target} (floor {floors[target]}) from floor {floor}")
    return bad


def package_cycles(root: Path, packages: list[str]) -> list[list[str]]:
    """Cycles of the package-level import graph (each as a list of packages), found by depth-first search."""
    edges = {p: set() for p in packages}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            edges[package] |= {t for _, t in project_imports(path, dict.fromkeys(packages, 0)) if t != package}
    cycles, state = [], dict.fromkeys(packages, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for package in packages:
        if state[package] == 0:
            visit(package, [package])
    return cycles


def test_every_project_package_has_a_floor():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - set(OUTSIDE)
    assert packages == set(FLOORS), "a new package needs its floor in FLOORS and in the README's Code layout"


def test_imports_point_down():
    assert violations(ROOT, FLOORS) == []


def test_no_package_level_import_cycle():
    assert package_cycles(ROOT, sorted(FLOORS)) == []


def test_nothing_below_the_recipes_imports_them():
    users = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in FLOORS
        if package != "recipes"
        for path in (ROOT / package).rglob("*.py")
        for line, target in project_imports(path, FLOORS)
        if target == "recipes"
    ]
    assert users == []


def test_ground_floor_imports_nothing_of_the_project():
    used = {t for path in (ROOT / "collapse").rglob("*.py") for _, t in project_imports(path, FLOORS)}
    assert used <= {"collapse"}


@pytest.mark.parametrize(
    "source,expected",
    [
        ("from engine.loop import run_generations\n", ["low/x.py:1 imports engine (floor 6) from floor 0"]),
        ("def f():\n    import recipes.mnist_vae\n", ["low/x.py:2 imports recipes (floor 7) from floor 0"]),
        ("from collapse.errors import UserError\n", []),
    ],
)
def test_the_check_sees_imports_that_point_up(tmp_path, source, expected):
    for package in ("low", "engine", "recipes"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "low" / "x.py").write_text(source.replace("collapse.", "low."))
    floors = {"low": 0, "engine": 6, "recipes": 7}
    assert violations(tmp_path, floors) == expected


def test_the_check_sees_a_cycle(tmp_path):
    for package, target in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"import {target}\n")
    assert package_cycles(tmp_path, ["a", "b", "c"]) == [["a", "b", "c", "a"]]
