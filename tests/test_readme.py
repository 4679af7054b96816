"""The README's first commands work as written: set-up, the one-minute first run, the main job and the tests.

A newcomer copies these blocks verbatim, so the test reads them from README.md itself: every script and recipe
they name exists, every recipe flag is one the recipe's parser accepts, the first run prints what the README
shows, and a recipe started with a python that lacks the project stops with one line saying how to fix it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from collapse.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
NUMBER = r"[-+]?(?:\d[\d.]*(?:e[-+]?\d+)?|inf|nan)"
"""A number as the progress lines print it (values, sizes, indices, seconds)."""


def section(heading: str) -> str:
    """The README text under the heading that starts with ``heading``, up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    lines = README.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert starts, f"README has no heading starting with {heading!r}"
    body = []
    for line in lines[starts[0] + 1 :]:
        marks = line.split(" ", 1)[0]
        if set(marks) == {"#"} and len(marks) <= len(level):
            break
        body.append(line)
    return "\n".join(body)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``text`` opened with ``language`` ("" for a plain block), in order."""
    found, lang, body = [], None, []
    for line in text.splitlines():
        if lang is None and line.startswith("```"):
            lang, body = line[3:].strip(), []
        elif lang is not None and line.strip() == "```":
            if lang == language:
                found.append("\n".join(body) + "\n")
            lang = None
        elif lang is not None:
            body.append(line)
    return found


def commands(block: str) -> list[list[str]]:
    """The shell commands of a block as token lists: continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def pipeline(tokens: list[str]) -> list[list[str]]:
    """A command line split at ``&&`` into its commands."""
    out: list[list[str]] = [[]]
    for token in tokens:
        if token == "&&":
            out.append([])
        else:
            out[-1].append(token)
    return out


def recipe_args(tokens: list[str]) -> list[str]:
    """A recipe command's flags, without the ones that print and exit or name a file made by an earlier command."""
    args, skip = [], False
    for token in tokens[2:]:
        if skip:
            skip = False
        elif token == ">":
            break
        elif token == "--config":
            skip = True
        elif token not in ("--help", "--print_config"):
            args.append(token)
    return args


def config_class(script: str) -> type:
    """The recipe config dataclass (the one with ``out_dir``) of ``recipes/x.py``."""
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    found = [
        c
        for name, c in inspect.getmembers(module, inspect.isclass)
        if name.endswith("Config") and c.__module__ == module.__name__ and "out_dir" in c.__dataclass_fields__
    ]
    assert len(found) == 1, f"{script}: expected one recipe config dataclass, found {found}"
    return found[0]


def check_command(tokens: list[str]) -> None:
    """Fail unless the script a command runs exists and, for a recipe, its parser accepts every flag."""
    if tokens[0] in ("bash", "python", ".venv/bin/python"):
        assert (ROOT / tokens[1]).is_file(), f"{shlex.join(tokens)}: no such script {tokens[1]}"
    if tokens[0] in ("python", ".venv/bin/python") and tokens[1].startswith("recipes/"):
        parse_config(config_class(tokens[1]), recipe_args(tokens))  # an unknown flag or bad value exits


QUICK = section("## Set-up and a first run")
QUICK_COMMANDS = commands(blocks(QUICK, "bash")[0])
FIRST_RUN = [c for c in QUICK_COMMANDS if c[0] == "python" and c[1].startswith("recipes/")]


def test_quick_start_sets_up_activates_and_names_real_scripts_and_flags():
    assert QUICK_COMMANDS[0] == ["bash", "scripts/setup.sh"]
    assert QUICK_COMMANDS[1] == ["source", ".venv/bin/activate"]  # before the first `python`
    assert "-m venv .venv" in (ROOT / "scripts" / "setup.sh").read_text()
    assert {c[1] for c in FIRST_RUN} == {"recipes/gaussian.py", "recipes/toy_gaussian.py"}  # analytic + Lightning
    for tokens in QUICK_COMMANDS:
        check_command(tokens)


def test_main_job_and_test_commands_exist():
    cmds = commands(blocks(section("## The main job and the test suite"), "bash")[0])
    assert [c[1] for c in cmds] == ["scripts/main.sh", "scripts/test.sh", "scripts/test.sh"]
    assert ["-m", "not slow"] in [c[2:] for c in cmds]  # the quick subset, next to the whole suite
    for tokens in cmds:
        check_command(tokens)
    assert '"$@"' in (ROOT / "scripts" / "test.sh").read_text()  # the -m "not slow" reaches pytest
    assert '"slow:' in (ROOT / "pyproject.toml").read_text()  # a registered marker (pytest runs --strict-markers)


def test_the_torch_index_override_is_one_setup_reads():
    [block] = blocks(section("### Installing torch elsewhere"), "bash")
    [tokens] = commands(block)
    name = tokens[0].split("=", 1)[0]
    assert tokens[1:] == ["bash", "scripts/setup.sh"] and f"${{{name}" in (ROOT / "scripts" / "setup.sh").read_text()


def test_recipe_examples_use_real_flags():
    cmds = [part for tokens in commands(blocks(section("## Recipes"), "bash")[0]) for part in pipeline(tokens)]
    assert any("--print_config" in c for c in cmds) and any("--config" in c for c in cmds)
    for tokens in cmds:
        check_command(tokens)


def run_in(cwd: Path, tokens: list[str]) -> subprocess.CompletedProcess:
    """Run one README command in ``cwd`` with this interpreter (the venv's), the recipe path made absolute."""
    assert tokens[0] == "python"
    out = None
    if ">" in tokens:  # python ... > file
        at = tokens.index(">")
        tokens, out = tokens[:at], cwd / tokens[at + 1]
    res = subprocess.run([sys.executable, str(ROOT / tokens[1]), *tokens[2:]], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{shlex.join(tokens)}:\n{res.stderr[-3000:]}"
    if out is not None:
        out.write_text(res.stdout)
    return res


def line_pattern(line: str) -> re.Pattern:
    """A README output line as a pattern: its numbers match any number, a ``...`` any text."""
    parts = []
    for part in line.split("..."):
        pieces = re.split(r"(\d[\d.]*(?:e[-+]?\d+)?)", part)  # text, number, text, number, ..., text
        parts.append("".join(NUMBER if i % 2 else re.escape(piece) for i, piece in enumerate(pieces)))
    return re.compile(".*".join(parts))


@pytest.mark.slow
def test_first_run_prints_what_the_readme_shows(tmp_path):
    printed = []
    for tokens in FIRST_RUN:
        printed += run_in(tmp_path, tokens).stdout.splitlines()
    expected = [line for line in blocks(QUICK, "")[0].splitlines() if line.strip() and line.strip() != "..."]
    for line in expected:
        pattern = line_pattern(line)
        assert any(pattern.fullmatch(got) for got in printed), f"README shows {line!r}; printed:\n" + "\n".join(printed)
    assert sum(got.startswith("[toy]") for got in printed) == sum(line.startswith("[toy]") for line in expected)
    assert (tmp_path / "runs" / "smoke_gaussian" / "report" / "report.md").is_file()
    assert (tmp_path / "runs" / "smoke_toy" / "gen_002").is_dir()


@pytest.mark.slow
def test_print_config_example_round_trips_a_small_grid(tmp_path):
    line = next(c for c in commands(blocks(section("## Recipes"), "bash")[0]) if "--print_config" in c)
    config_line = next(c for c in commands(blocks(section("## Recipes"), "bash")[0]) if "--config" in c)
    for tokens in [*pipeline(line), *pipeline(config_line)]:
        run_in(tmp_path, tokens)
    assert "out_dir: runs/g_small" in (tmp_path / "g.yaml").read_text()
    assert (tmp_path / "runs" / "g_small" / "metrics.csv").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_run_with_a_python_without_the_project_says_how_to_fix_it(recipe, tmp_path):
    # -S: no site-packages (so neither the project's editable install nor its dependencies); -E, -s: nor
    # PYTHONPATH or user site-packages. The interpreter is the same, the standard library is all there is.
    res = subprocess.run(
        [sys.executable, "-S", "-E", "-s", str(recipe), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: the project is not installed for this python (")
    assert res.stderr.count("\n") == 1  # one line, no traceback
    assert "bash scripts/setup.sh" in res.stderr and ".venv/bin/python" in res.stderr


def test_the_recipes_check_the_interpreter_only_when_run_as_scripts():
    # Imported as modules (tests, sweep tooling) they must not look for a top-level module next to them.
    for recipe in RECIPES:
        importlib.import_module(f"recipes.{recipe.stem}")
    assert "_env_check" not in sys.modules
