"""Stop a recipe started with a python that cannot import the project, with one line that says what to do.

A recipe runs as ``python recipes/x.py``: its own folder is on ``sys.path``, so this module imports even where
the project is not installed, and it runs before the recipe's project imports, which would otherwise end in a
``ModuleNotFoundError`` traceback (typically: the system ``python`` instead of ``.venv/bin/python``). It only
looks the packages up (no import), so it costs nothing and keeps torch off the analytic recipes' import path.
Standard library only, and no syntax newer than Python 3.6, so an older interpreter prints the line too.
"""

import importlib.util
import sys

REQUIRED = ("collapse", "numpy", "yaml", "jsonargparse", "torch", "lightning")
"""Top-level modules every recipe's import path needs: the project itself and its core dependencies."""

MIN_PYTHON = (3, 10)


def problem():
    """What is wrong with this interpreter for the project, or None."""
    if sys.version_info < MIN_PYTHON:
        return f"Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ is needed, this is {sys.version_info[0]}.{sys.version_info[1]}"
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    return "no module named " + ", ".join(missing) if missing else None


def check():
    """Exit with status 2 and one ``error:`` line when this python cannot run the recipes."""
    found = problem()
    if found is not None:
        sys.stderr.write(
            f"error: the project is not installed for this python ({sys.executable}: {found}); run "
            "'bash scripts/setup.sh' and use .venv/bin/python (or activate .venv: source .venv/bin/activate)\n"
        )
        sys.exit(2)


check()
